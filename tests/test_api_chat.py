"""POST /v1/chat/completions over a fake node: bodies, SSE framing, stop strings, limits, errors."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

from exo.api.cluster_port import (
    ClusterUnavailable,
    GenerationAborted,
    InstanceFailed,
    InstanceNotReady,
    NoCapacity,
    Overloaded,
    ServiceError,
)
from exo.api.completion import CompletionSettings
from exo.core.sampling import SamplingParams
from tests.harness.api_checks import assert_error, sse_events, streamed_text, wait_until_generation_ends
from tests.harness.fakes import END_OF_SEQUENCE, FakeNodeServices

USER_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def completion_settings() -> CompletionSettings:
    return CompletionSettings(default_max_tokens=64, instance_ready_timeout_s=42.0)


def complete(client: TestClient[Any], **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "exo-tiny", "messages": USER_HI, **body})


def test_non_streaming_completion(client: TestClient[Any], services: FakeNodeServices) -> None:
    response = complete(client)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "exo-tiny"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world!"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    prompt = [ord(character) for character in "<user>hi<assistant>"]
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 5,
        "total_tokens": len(prompt) + 5,
    }
    (call,) = services.generate_calls
    assert call.prompt_tokens == prompt
    assert call.max_tokens == 64  # the server default
    assert call.finished
    assert services.ensure_timeouts == [42.0]


def test_streaming_completion_format(client: TestClient[Any]) -> None:
    events = sse_events(complete(client, stream=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}
    assert {chunk["created"] for chunk in chunks} == {chunks[0]["created"]}
    assert {chunk["model"] for chunk in chunks} == {"exo-tiny"}
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["id"].startswith("chatcmpl-")
    finish_reasons = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert finish_reasons == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert streamed_text(events) == "Hello world!"
    assert all("usage" not in chunk for chunk in chunks)


def test_streaming_usage_chunk(client: TestClient[Any]) -> None:
    events = sse_events(complete(client, stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("world", "Hello "),  # inside one token's neighbourhood
        ("lo w", "Hel"),  # split across three tokens: "lo", " wo"
        (["zzz", "o w"], "Hell"),  # the earliest match of any
        ("Hel", ""),  # at the very start
        ("!", "Hello world"),  # the last token
        ("d!?", "Hello world!"),  # a prefix held back, then released at the end
    ],
)
def test_stop_strings(
    client: TestClient[Any], services: FakeNodeServices, stream: bool, stop: str | list[str], expected: str
) -> None:
    response = complete(client, stream=stream, stop=stop)
    if stream:
        events = sse_events(response)
        text = streamed_text(events)
        finish_reason = events[-2]["choices"][0]["finish_reason"]
    else:
        text = response.json()["choices"][0]["message"]["content"]
        finish_reason = response.json()["choices"][0]["finish_reason"]
    assert text == expected
    assert finish_reason == "stop"
    (call,) = services.generate_calls
    matched = expected != "Hello world!"
    # A match cancels the generation: the token iterator is closed before its end.
    wait_until_generation_ends(call)
    if expected != "Hello world":  # a match on the last token races the natural end: either is fine
        assert call.closed_early == matched


def test_stop_string_completion_tokens_count_what_was_generated(client: TestClient[Any]) -> None:
    body = complete(client, stop="lo w").json()
    assert body["usage"]["completion_tokens"] == 3  # "Hel", "lo", " wo": the match is seen at " wo"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_finishes_with_length(
    client: TestClient[Any], services: FakeNodeServices, stream: bool, field: str
) -> None:
    response = complete(client, stream=stream, **{field: 2})
    if stream:
        events = sse_events(response)
        assert streamed_text(events) == "Hello"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    else:
        body = response.json()
        assert body["choices"][0]["message"]["content"] == "Hello"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 2
    assert services.generate_calls[0].max_tokens == 2


def test_max_completion_tokens_wins_over_max_tokens(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    body = complete(client, max_tokens=4, max_completion_tokens=1).json()
    assert body["choices"][0]["message"]["content"] == "Hel"
    assert services.generate_calls[0].max_tokens == 1


def test_max_tokens_is_enforced_even_if_the_node_overshoots(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    services.end_with_eos = False

    original = services.generate

    def overshooting(*args: Any) -> Any:
        instance, prompt, sampling, _ = args
        return original(instance, prompt, sampling, 100)

    services.generate = overshooting  # type: ignore[method-assign]
    body = complete(client, max_tokens=3).json()
    assert body["choices"][0]["message"]["content"] == "Hello wo"
    assert body["choices"][0]["finish_reason"] == "length"
    wait_until_generation_ends(services.generate_calls[0])
    assert services.generate_calls[0].closed_early


def test_iterator_ending_without_finish_reason_is_a_stop(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    services.end_with_eos = False
    body = complete(client).json()
    assert body["choices"][0]["message"]["content"] == "Hello world!"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_end_of_sequence_token_is_not_rendered(client: TestClient[Any], services: FakeNodeServices) -> None:
    services.script = [1000, END_OF_SEQUENCE, 1001]
    services.end_with_eos = False
    body = complete(client).json()
    assert body["choices"][0]["message"]["content"] == "Hel"
    assert body["usage"]["completion_tokens"] == 1


def test_sampling_parameters_reach_the_node(client: TestClient[Any], services: FakeNodeServices) -> None:
    complete(client, temperature=0.2, top_p=0.9, top_k=40, seed=7)
    complete(client)
    explicit, default = (call.sampling for call in services.generate_calls)
    assert explicit == SamplingParams(temperature=0.2, top_p=0.9, top_k=40, seed=7)
    assert default == SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=None)


def test_content_as_text_parts(client: TestClient[Any], services: FakeNodeServices) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
        {"role": "assistant", "content": None},
    ]
    response = client.post("/v1/chat/completions", json={"model": "exo-tiny", "messages": messages})
    assert response.status_code == 200, response.text
    prompt = "".join(chr(token) for token in services.generate_calls[0].prompt_tokens)
    assert prompt == "<system>be brief<user>hello<assistant><assistant>"


def test_unknown_request_fields_are_ignored(client: TestClient[Any]) -> None:
    response = complete(client, user="someone", presence_penalty=0.5, logprobs=False, n=1)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "exo-tiny"}, "messages"),
        ({"model": "exo-tiny", "messages": []}, "messages"),
        ({"model": "exo-tiny", "messages": "hi"}, "messages"),
        ({"messages": USER_HI}, "model"),
        ({"model": "", "messages": USER_HI}, "model"),
        ({"model": 7, "messages": USER_HI}, "model"),
        ({"model": "exo-tiny", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "exo-tiny", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": "exo-tiny", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        (
            {"model": "exo-tiny", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0].type",
        ),
        ({"model": "exo-tiny", "messages": USER_HI, "temperature": "hot"}, "temperature"),
        ({"model": "exo-tiny", "messages": USER_HI, "temperature": 3}, "temperature"),
        ({"model": "exo-tiny", "messages": USER_HI, "top_p": 0}, "top_p"),
        ({"model": "exo-tiny", "messages": USER_HI, "top_k": -1}, "top_k"),
        ({"model": "exo-tiny", "messages": USER_HI, "seed": 1.5}, "seed"),
        ({"model": "exo-tiny", "messages": USER_HI, "max_tokens": 0}, "max_tokens"),
        ({"model": "exo-tiny", "messages": USER_HI, "max_tokens": "5"}, "max_tokens"),
        ({"model": "exo-tiny", "messages": USER_HI, "max_completion_tokens": -3}, "max_completion_tokens"),
        ({"model": "exo-tiny", "messages": USER_HI, "stream": "yes"}, "stream"),
        ({"model": "exo-tiny", "messages": USER_HI, "stop": 5}, "stop"),
        ({"model": "exo-tiny", "messages": USER_HI, "stop": [""]}, "stop[0]"),
        ({"model": "exo-tiny", "messages": USER_HI, "n": 17}, "n"),
        ({"model": "exo-tiny", "messages": USER_HI, "n": 0}, "n"),
    ],
)
def test_bad_request_names_the_field(client: TestClient[Any], body: dict[str, Any], param: str) -> None:
    response = client.post("/v1/chat/completions", json=body)
    message = assert_error(response, 400, "invalid_request", param)
    assert f"'{param}'" in message


@pytest.mark.parametrize(
    "content", [b"{not json", b"", b'{"model": "exo-tiny", "messages": [', b"[]", b'"x"']
)
def test_malformed_or_non_object_body(client: TestClient[Any], content: bytes) -> None:
    response = client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, 400)


def test_image_content_is_refused(client: TestClient[Any]) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    response = client.post("/v1/chat/completions", json={"model": "exo-tiny", "messages": messages})
    message = assert_error(response, 400, "unsupported_content", "messages[0].content[0]")
    assert "image" in message


def test_chat_template_refusal_is_a_bad_request(client: TestClient[Any], services: FakeNodeServices) -> None:
    services.tokenizers["exo-tiny"].refuse_with = ValueError("Conversation roles must alternate")
    message = assert_error(complete(client), 400, "invalid_messages", "messages")
    assert "roles must alternate" in message
    assert services.generate_calls == []


def test_unknown_model(client: TestClient[Any], services: FakeNodeServices) -> None:
    response = client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": USER_HI})
    message = assert_error(response, 404, "model_not_found", "model")
    assert "gpt-9" in message
    assert services.generate_calls == []


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("error", "status_code", "code", "text"),
    [
        (
            NoCapacity("exo-tiny", ["node1: short by 2.00 GiB"]),
            503,
            "no_capacity",
            "node1: short by 2.00 GiB",
        ),
        (InstanceFailed("i-1", "runner crashed"), 503, "instance_failed", "runner crashed"),
        (InstanceNotReady("i-1", 30), 504, "instance_not_ready", "not ready after 30 s"),
        (ClusterUnavailable("no master"), 503, "cluster_unavailable", "no master"),
    ],
)
def test_errors_before_generation_are_http_errors(  # noqa: PLR0917 (pytest parameters)
    client: TestClient[Any],
    services: FakeNodeServices,
    stream: bool,
    error: ServiceError,
    status_code: int,
    code: str,
    text: str,
) -> None:
    services.ensure_error = error
    message = assert_error(complete(client, stream=stream), status_code, code)
    assert text in message


def test_stage_failure_mid_stream_ends_with_an_error_event(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    services.script = [1000, 1001, GenerationAborted("i-1", "stage on node1 went away"), 1002]
    events = sse_events(complete(client, stream=True))
    assert "[DONE]" not in events
    error = events[-1]["error"]
    assert error["type"] == "server_error"
    assert error["code"] == "generation_failed"
    assert "stage on node1 went away" in error["message"]
    assert streamed_text(events[:-1]) == "Hello"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in events[:-1])


def test_stage_failure_before_the_first_token_of_a_stream_is_an_http_error(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    """A streamed answer's headers wait for the first token, so a failure at the start is a 500."""
    services.script = [GenerationAborted("i-1", "stage failed to load")]
    message = assert_error(complete(client, stream=True), 500, "generation_failed")
    assert "stage failed to load" in message


@pytest.mark.parametrize("stream", [False, True])
def test_an_overloaded_instance_is_503_with_retry_after(
    client: TestClient[Any], services: FakeNodeServices, stream: bool
) -> None:
    services.script = [Overloaded("i-1", "8 requests running, queue full", retry_after_s=2.5)]
    response = complete(client, stream=stream)
    assert "queue full" in assert_error(response, 503, "overloaded")
    assert response.headers["retry-after"] == "3"


def test_stage_failure_without_streaming_is_a_server_error(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    services.script = [1000, GenerationAborted("i-1", "stage on node1 went away")]
    message = assert_error(complete(client), 500, "generation_failed")
    assert "stage on node1 went away" in message
