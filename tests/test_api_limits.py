"""No request can stall a node: body and depth limits, parsing and tokenizing off the event loop,
slow-header connections closed, a connection cap, rate-limited accept errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from litestar.testing import TestClient

from exo.api.app import create_app
from exo.api.body_limits import DEFAULT_MAX_BODY_BYTES, MAX_JSON_DEPTH, TooDeep, check_json_depth
from exo.api.http_guard import HEADER_TIMEOUT_SECONDS, AcceptErrorLimiter, uvicorn_options
from tests.harness.api_checks import assert_error
from tests.harness.cluster_harness import free_port
from tests.harness.fakes import FakeNodeServices, FakeTokenizer

CHAT = "/v1/chat/completions"
DEADLINE = 30.0  # generous behavioural deadline on a loaded 2-core machine
TOKENIZE_SECONDS = 4.0  # the simulated tokenization; the loop must never stall for most of it


def chat_body(content: str) -> dict[str, Any]:
    return {"model": "exo-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2}


# --- body size and depth -----------------------------------------------------------------------


def test_a_body_over_the_limit_is_a_413_in_openais_shape() -> None:
    with TestClient(create_app(FakeNodeServices(), max_request_bytes=64 * 1024)) as client:
        assert_error(client.post(CHAT, json=chat_body("x" * 70_000)), 413, "request_too_large")
        assert client.post(CHAT, json=chat_body("hello")).status_code == 200
    assert 1024 * 1024 <= DEFAULT_MAX_BODY_BYTES <= 8 * 1024 * 1024  # "a few MB"


@pytest.mark.parametrize("route", [CHAT, "/v1/completions", "/v1/messages", "/place_instance"])
def test_json_nested_200k_deep_is_a_400_not_a_500(route: str) -> None:
    deep = b'{"model": "exo-tiny", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with TestClient(create_app(FakeNodeServices())) as client:
        headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
        response = client.post(route, content=deep, headers=headers)
    if route.startswith("/v1/messages"):
        assert response.status_code == 400, response.text
        assert "nested deeper than" in response.json()["error"]["message"]
    else:
        message = assert_error(response, 400, "invalid_request")
        assert f"nested deeper than {MAX_JSON_DEPTH} levels" in message


def test_the_depth_check_counts_structure_not_brackets_inside_strings() -> None:
    check_json_depth(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    with pytest.raises(TooDeep):
        check_json_depth(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    check_json_depth(b'{"a": "' + b"[{" * 10_000 + b'", "b": "\\"[[["}')
    with pytest.raises(TooDeep):
        check_json_depth(
            b'{"a": "\\\\"' + b"[" * (MAX_JSON_DEPTH + 1)
        )  # an escaped backslash ends the string


# --- the event loop keeps running --------------------------------------------------------------


class SlowTokenizer(FakeTokenizer):
    """Tokenizing takes a while (as a 15 MB prompt does), releasing the GIL as fast tokenizers do."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def apply_chat_template(self, conversation: list[dict[str, Any]], **options: Any) -> list[int]:
        self.started.set()
        time.sleep(TOKENIZE_SECONDS)  # the work being simulated, not a synchronisation
        return super().apply_chat_template(conversation[:1], **options)[:64]


@contextlib.asynccontextmanager
async def serving(services: FakeNodeServices, **app_options: Any) -> AsyncIterator[str]:
    limits = app_options.pop("limits", {})
    config = uvicorn.Config(
        create_app(services, **app_options),
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
        lifespan="on",
        **uvicorn_options(**({"max_connections": 64} | limits)),
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(DEADLINE):
            while not server.started:  # noqa: ASYNC110 (uvicorn offers a flag, not an event)
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        await task


async def test_a_big_chat_request_does_not_hold_the_event_loop() -> None:
    """While a 3 MB chat request is parsed and its (slow) prompt tokenized, the loop keeps
    ticking and /health answers: heartbeats would go on."""
    services = FakeNodeServices()
    tokenizer = SlowTokenizer()
    services.tokenizers["exo-tiny"] = tokenizer
    gaps: list[float] = []
    async with serving(services) as url, httpx.AsyncClient(base_url=url, timeout=DEADLINE) as client:
        big = asyncio.create_task(client.post(CHAT, json=chat_body("lorem ipsum " * 250_000)))

        async def tick() -> None:
            last = time.monotonic()
            while not big.done():
                await asyncio.sleep(0.02)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        assert await asyncio.to_thread(tokenizer.started.wait, DEADLINE), "the prompt was never tokenized"
        assert (await client.get("/health")).status_code == 200
        assert not big.done(), "/health was answered only after the tokenizing ended"
        response = await big
        await ticker
    assert response.status_code == 200, response.text
    assert max(gaps) < TOKENIZE_SECONDS * 0.75, f"the event loop stalled for {max(gaps):.2f} s"


# --- connections --------------------------------------------------------------------------------


def read_until_closed(connection: socket.socket, deadline: float) -> bytes:
    connection.settimeout(deadline)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


async def test_a_connection_sending_its_headers_slowly_is_closed() -> None:
    assert HEADER_TIMEOUT_SECONDS <= 10
    async with serving(FakeNodeServices(), limits={"header_timeout": 0.5}) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            started = time.monotonic()
            received = await asyncio.to_thread(read_until_closed, connection, DEADLINE)
            assert received == b"" and time.monotonic() - started < DEADLINE
        # A client that sends its request in time is answered, and again on the same connection.
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(2):
                assert (await client.get("/health")).status_code == 200


async def test_connections_past_the_cap_are_refused_at_once_and_others_still_served() -> None:
    async with serving(FakeNodeServices(), limits={"max_connections": 4}) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            with socket.create_connection(("127.0.0.1", port)) as extra:
                refused = await asyncio.to_thread(read_until_closed, extra, DEADLINE)
            assert refused.startswith(b"HTTP/1.1 503 ")
            assert b'"code":"too_many_connections"' in refused
        finally:
            for connection in idle:
                connection.close()
        async with httpx.AsyncClient(base_url=url, timeout=DEADLINE) as client:
            for _ in range(20):  # the idle ones are gone once the server has seen them close
                if (await client.get("/health")).status_code == 200:
                    break
            else:
                pytest.fail("the server never served again after the idle connections closed")


def test_accept_errors_are_logged_once_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    others: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: others.append(context))
    limiter = AcceptErrorLimiter(loop, interval=3600).install()
    context = {
        "message": "socket.accept() out of system resource",
        "exception": OSError(24, "Too many open files"),
    }
    with caplog.at_level(logging.ERROR, logger="exo.api.http_guard"):
        for _ in range(1000):
            loop.call_exception_handler(dict(context))
        loop.call_exception_handler({"message": "something else"})
    loop.close()
    lines = [record for record in caplog.records if record.name == "exo.api.http_guard"]
    assert len(lines) == 1 and "Too many open files" in lines[0].getMessage()
    assert (limiter.seen, limiter.suppressed) == (1000, 999)
    assert [context["message"] for context in others] == ["something else"]
