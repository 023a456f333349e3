"""The official `openai` SDK's Responses client against the app over a fake node, in process.

The SDK parses every body and event into its own types, so these tests catch a field or event it
cannot read. The fake makes the answers exact (an end of sequence, a tool call), which the random
weights of tests/test_api_sdks.py's real node cannot; that file runs the same calls over a socket.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import openai
import pydantic
import pytest
from litestar.testing import TestClient

from exo.api.app import create_app
from exo.api.completion import CompletionSettings
from tests.harness.fakes import FakeNodeServices, FakeTokenizer

CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


@pytest.fixture
def services() -> FakeNodeServices:
    fake = FakeNodeServices()
    fake.token_interval = 0.0
    script(fake, "Hello there.")
    return fake


@pytest.fixture
def client(services: FakeNodeServices) -> Iterator[openai.OpenAI]:
    app = create_app(services, completion_settings=CompletionSettings(default_max_tokens=256))
    with TestClient(app) as test_client:
        # TestClient is an httpx.Client, which the SDK takes (its annotation names httpx2's Client).
        http_client = cast(Any, test_client)
        yield openai.OpenAI(
            base_url=f"{test_client.base_url}/v1", api_key="unused", http_client=http_client, max_retries=0
        )


def script(services: FakeNodeServices, text: str) -> None:
    services.tokenizers["exo-tiny"] = FakeTokenizer()
    services.script = [ord(character) for character in text]


def test_create_retrieve_delete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="exo-tiny", input="hi", instructions="Be brief.", metadata={"a": "b"}
    )
    assert response.status == "completed" and response.output_text == "Hello there."
    assert response.usage is not None and response.usage.output_tokens == len("Hello there.")
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.instructions == "Be brief." and response.metadata == {"a": "b"}
    assert client.responses.retrieve(response.id).output_text == "Hello there."
    items = client.responses.input_items.list(response.id)
    assert [item.type for item in items.data] == ["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(response.id)
    assert refused.value.code == "response_not_in_progress"
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_stream_events_and_the_stream_helper(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="exo-tiny", input="hi", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "Hello there."
    with client.responses.stream(model="exo-tiny", input="hi") as stream:
        snapshots = [event.snapshot for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert snapshots[-1] == final.output_text == "Hello there."
    assert final.status == "completed"


def test_chaining_with_previous_response_id(client: openai.OpenAI, services: FakeNodeServices) -> None:
    first = client.responses.create(model="exo-tiny", input="one")
    second = client.responses.create(model="exo-tiny", input="two", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    prompt = "".join(chr(token) for token in services.generate_calls[-1].prompt_tokens)
    assert prompt == "<user>one<assistant>Hello there.<user>two<assistant>"
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="exo-tiny", input="x", previous_response_id="resp_gone")
    assert missing.value.code == "previous_response_not_found"


def test_function_tool_round_trip(client: openai.OpenAI, services: FakeNodeServices) -> None:
    script(services, CALL_TEXT)
    with client.responses.stream(model="exo-tiny", input="Weather in Paris?", tools=[WEATHER]) as stream:
        argument_snapshots = [
            event.snapshot for event in stream if event.type == "response.function_call_arguments.delta"
        ]
        first = stream.get_final_response()
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} == json.loads(argument_snapshots[-1])
    script(services, "It is sunny.")
    second = client.responses.create(
        model="exo-tiny",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}],
        tools=[WEATHER],
    )
    assert second.output_text == "It is sunny."
    turns = services.tokenizers["exo-tiny"].rendered[-1]
    assert [turn["role"] for turn in turns] == ["user", "assistant", "tool"]
    assert turns[2]["tool_call_id"] == call.call_id


def test_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model="exo-tiny", input="hi", max_output_tokens=3)
    assert response.status == "incomplete" and response.output_text == "Hel"
    assert (
        response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    )
    with client.responses.stream(model="exo-tiny", input="hi", max_output_tokens=3) as stream:
        last = [event for event in stream][-1]
        assert last.type == "response.incomplete"
        # As against OpenAI: the helper's final response needs response.completed.
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            stream.get_final_response()


class Answer(pydantic.BaseModel):
    city: str


def test_structured_output_reaches_the_chat_path(client: openai.OpenAI, services: FakeNodeServices) -> None:
    """`.parse()` sends text.format json_schema; the chat path turns it into the grammar the
    sampling stage enforces (the fake answers what such a grammar allows), and the SDK parses it."""
    script(services, '{"city":"Paris"}')
    parsed = client.responses.parse(model="exo-tiny", input="hi", text_format=Answer)
    assert parsed.output_parsed == Answer(city="Paris")
    grammar = services.generate_calls[-1].sampling.grammar
    assert grammar is not None and '"city"' in grammar.lark


def test_bad_input_is_a_typed_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="exo-tiny", input=[{"type": "input_audio"}])  # type: ignore[list-item]
    assert refused.value.code == "unsupported_input_item" and refused.value.param == "input[0].type"
    with pytest.raises(openai.BadRequestError) as empty:
        client.responses.create(model="exo-tiny", input="")
    assert empty.value.param == "input"


def test_logprobs_parse(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="exo-tiny", input="hi", include=["message.output_text.logprobs"], top_logprobs=1
    )
    message = response.output[0]
    assert message.type == "message" and message.content[0].type == "output_text"
    logprobs = message.content[0].logprobs
    assert logprobs is not None and "".join(entry.token for entry in logprobs) == "Hello there."
    assert all(len(entry.top_logprobs) == 1 for entry in logprobs)
