"""The Responses API's lifecycle over a fake node: the bounded store, cancelling in-flight streams,
clients that leave, and the translation into the chat request."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from exo.api.app import create_app
from exo.api.completion import CompletionSettings
from exo.api.errors import ApiError
from exo.api.openai_types import NamedFunction, NamedToolChoice, ResponseFormat
from exo.api.responses import translate
from exo.api.responses_routes import Responses, response_stream, start_response
from exo.api.responses_store import ResponseStore, StoredResponse
from exo.api.responses_types import (
    OutputMessage,
    ResponseObject,
    ResponsesRequest,
    TextConfig,
    TextFormatJsonObject,
)
from exo.api.runs import OPEN_READ_TIMEOUT_S, ActiveCompletions
from tests.harness.api_checks import assert_error
from tests.harness.fakes import FakeNodeServices
from tests.harness.responses_checks import WEATHER, create

# --- the store --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_bounds_entries_bytes_and_age() -> None:
    entry = StoredResponse(response=a_response(), input_items=[], conversation=[], size=10)
    clock = Clock()
    store = ResponseStore(max_entries=2, ttl_s=60, max_bytes=25, clock=clock)
    store.put("a", entry)
    store.put("b", entry)
    store.put("c", entry)
    assert store.get("a") is None and store.get("b") is entry and len(store) == 2  # the oldest left
    store.put("d", StoredResponse(response=entry.response, input_items=[], conversation=[], size=20))
    assert store.get("b") is None and store.get("c") is None and store.get("d") is not None  # bytes bound
    assert store.bytes == 20
    clock.now = 59.0
    assert store.get("d") is not None
    clock.now = 60.0
    assert store.get("d") is None and len(store) == 0 and store.bytes == 0
    assert not store.delete("d")
    with pytest.raises(ValueError, match="max_entries"):
        ResponseStore(max_entries=0)


def a_response() -> ResponseObject:
    return ResponseObject(
        id="resp_1",
        created_at=0,
        status="completed",
        model="exo-tiny",
        output=[],
        instructions=None,
        previous_response_id=None,
        max_output_tokens=None,
        temperature=None,
        top_p=None,
        tools=[],
        tool_choice="auto",
        parallel_tool_calls=True,
        text=TextConfig(),
        metadata={},
        store=True,
        top_logprobs=None,
    )


def test_the_app_takes_a_configured_store() -> None:
    services = FakeNodeServices()
    clock = Clock()
    store = ResponseStore(max_entries=1, ttl_s=5, clock=clock)
    with TestClient(create_app(services, response_store=store)) as client:
        first = create(client).json()
        second = create(client).json()
        assert_error(client.get(f"/v1/responses/{first['id']}"), 404)  # pushed out by the bound
        assert client.get(f"/v1/responses/{second['id']}").status_code == 200
        clock.now = 5.0
        message = assert_error(
            create(client, previous_response_id=second["id"]), 404, "previous_response_not_found"
        )
        assert "5 s" in message


async def test_cancel_an_in_flight_stream() -> None:
    """While a stream runs its stored response is in_progress; cancel stops the generation, and
    the stream ends with response.incomplete carrying status cancelled."""
    services = FakeNodeServices()
    services.script = [ord(character) for character in "a long answer " * 20]
    registry, responses = ActiveCompletions(), Responses()
    body = ResponsesRequest(model="exo-tiny", input="hi", stream=True)
    live = await start_response(services, CompletionSettings(), registry, responses, body, 10)
    await live.run.open()
    responses.begin(live)
    response_id = live.builder.response_id
    events: list[dict[str, Any]] = []
    async with aclosing(response_stream(live, responses)) as stream:
        async for chunk in stream:
            events.append(json.loads(chunk.split(b"data: ", 1)[1]))
            if len(events) == 6:
                stored = responses.store.get(response_id)
                assert stored is not None and stored.response.status == "in_progress"
                assert responses.cancel(response_id).status == "cancelled"
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["status"] == "cancelled"
    assert events[-2]["item"]["status"] == "incomplete"
    stored = responses.store.get(response_id)
    assert stored is not None and stored.response.status == "cancelled"
    assert response_id not in responses.live and len(registry) == 0
    with pytest.raises(ApiError, match="only a response in progress"):
        responses.cancel(response_id)
    async with asyncio.timeout(5):
        while not services.generate_calls[0].closed_early:
            await services.generation_closed.wait()
            services.generation_closed.clear()


async def test_a_client_gone_mid_stream_leaves_the_response_cancelled() -> None:
    services = FakeNodeServices()
    services.script = [ord(character) for character in "a long answer " * 20]
    responses = Responses()
    body = ResponsesRequest(model="exo-tiny", input="hi", stream=True)
    live = await start_response(services, CompletionSettings(), ActiveCompletions(), responses, body, 10)
    await live.run.open()
    responses.begin(live)
    stream = response_stream(live, responses)
    for _ in range(5):
        await anext(stream)
    await stream.aclose()
    stored = responses.store.get(live.builder.response_id)
    assert stored is not None and stored.response.status == "cancelled"
    (message,) = stored.response.output  # what was sent before the client left
    assert isinstance(message, OutputMessage) and message.status == "incomplete"
    assert message.content[0].text == "a"  # the one delta sent


def test_translation_to_the_chat_request() -> None:
    """What the chat path receives: it is what makes text.format and tools work once the chat path
    constrains decoding."""
    body = msgspec.convert(
        {
            "model": "exo-tiny",
            "input": "hi",
            "instructions": "rules",
            "max_output_tokens": 7,
            "tools": [WEATHER],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "text": {
                "format": {
                    "type": "json_schema",
                    "name": "answer",
                    "schema": {"type": "object"},
                    "strict": True,
                }
            },
        },
        ResponsesRequest,
    )
    chat = translate(body, None).chat
    assert chat.response_format == ResponseFormat(
        "json_schema", {"name": "answer", "schema": {"type": "object"}, "strict": True}
    )
    assert chat.max_tokens == 7 and chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.tools is not None and chat.tools[0].function.name == "get_weather"
    assert chat.tools[0].function.parameters == WEATHER["parameters"]
    assert [message.role for message in chat.messages] == ["system", "user"]
    json_object = msgspec.structs.replace(body, text=TextConfig(TextFormatJsonObject()))
    assert translate(json_object, None).chat.response_format == ResponseFormat("json_object")
    named = msgspec.structs.replace(body, tool_choice={"type": "function", "name": "get_weather"})
    assert translate(named, None).chat.tool_choice == NamedToolChoice(NamedFunction("get_weather"))


async def test_a_stream_whose_body_never_started_is_ended_later() -> None:
    """The client left right after the headers: the run was cancelled unread, and the next
    response begun on the node ends it (stored as cancelled, no longer cancellable)."""
    services = FakeNodeServices()
    responses = Responses()
    body = ResponsesRequest(model="exo-tiny", input="hi", stream=True)
    settings = CompletionSettings()
    abandoned = await start_response(services, settings, ActiveCompletions(), responses, body, 10)
    responses.begin(abandoned)
    abandoned.run.cancel()
    abandoned.run.finished_at = time.monotonic() - 2 * OPEN_READ_TIMEOUT_S - 1  # as its watchdog left it
    responses.begin(await start_response(services, settings, ActiveCompletions(), responses, body, 10))
    response_id = abandoned.builder.response_id
    assert response_id not in responses.live
    stored = responses.store.get(response_id)
    assert stored is not None and stored.response.status == "cancelled"
