"""The Responses API (/v1/responses...) over a fake node: bodies, the typed stream, chaining, the
store, cancellation and every kind of bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from exo.api.app import create_app
from exo.api.cluster_port import GenerationAborted
from exo.api.completion import CompletionSettings
from exo.api.decoding import ChoiceEnded, ReasoningDelta, TextDelta
from exo.api.openai_types import Usage
from exo.api.responses import translate
from exo.api.responses_output import ResponseBuilder
from exo.api.responses_types import ResponsesRequest
from tests.harness.api_checks import assert_error
from tests.harness.fakes import FakeNodeServices, FakeTokenizer, model_info
from tests.harness.responses_checks import WEATHER, create, stream_events

CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def app() -> Iterator[tuple[FakeNodeServices, TestClient[Any]]]:
    fake = FakeNodeServices()
    settings = CompletionSettings(default_max_tokens=256)
    with TestClient(create_app(fake, completion_settings=settings)) as test_client:
        yield fake, test_client


@pytest.fixture
def services(app: tuple[FakeNodeServices, TestClient[Any]]) -> FakeNodeServices:
    fake, _ = app
    fake.__dict__.update(FakeNodeServices().__dict__)  # a fresh fake in the object the app holds
    fake.tokenizers["exo-tiny"] = FakeTokenizer(
        {1000: "Hel", 1001: "lo", 1002: " wo", 1003: "rld", 1004: "!"}
    )
    fake.script = [1000, 1001, 1002, 1003, 1004]  # "Hello world!"
    return fake


@pytest.fixture
def client(app: tuple[FakeNodeServices, TestClient[Any]], services: FakeNodeServices) -> TestClient[Any]:
    return app[1]


def script_text(services: FakeNodeServices, text: str) -> None:
    services.tokenizers["exo-tiny"] = FakeTokenizer()
    services.script = [ord(character) for character in text]


def rendered(services: FakeNodeServices, call: int = -1) -> str:
    return "".join(chr(token) for token in services.generate_calls[call].prompt_tokens)


# --- whole answers ----------------------------------------------------------------------------


def test_string_input_answers_a_completed_response(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    response = create(client, metadata={"k": "v"}, temperature=0.5, top_p=0.9)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert body["status"] == "completed" and body["error"] is None and body["incomplete_details"] is None
    (message,) = body["output"]
    assert (
        message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    )
    assert message["id"].startswith("msg_")
    assert message["content"] == [
        {"type": "output_text", "text": "Hello world!", "annotations": [], "logprobs": []}
    ]
    usage = body["usage"]
    assert usage["input_tokens"] == len(services.generate_calls[0].prompt_tokens)
    assert usage["output_tokens"] == 5
    assert usage["total_tokens"] == usage["input_tokens"] + 5
    assert usage["input_tokens_details"] == {"cached_tokens": 0}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert body["metadata"] == {"k": "v"} and body["temperature"] == 0.5 and body["top_p"] == 0.9
    assert body["text"]["format"] == {"type": "text"} and body["tool_choice"] == "auto"
    assert rendered(services) == "<user>hi<assistant>"
    assert services.generate_calls[0].sampling.temperature == 0.5
    assert services.generate_calls[0].sampling.top_p == 0.9


def test_items_instructions_and_roles_reach_the_template(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    items = [
        {"role": "developer", "content": "be brief"},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"role": "user", "content": "c"},
    ]
    response = create(client, input=items, instructions="You are exo.")
    assert response.status_code == 200, response.text
    assert rendered(services) == "<system>You are exo.<system>be brief<user>ab<assistant>ok<user>c<assistant>"


def test_max_output_tokens_cuts_to_incomplete(client: TestClient[Any], services: FakeNodeServices) -> None:
    body = create(client, max_output_tokens=2).json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"
    assert body["output"][0]["content"][0]["text"] == "Hello"
    assert body["usage"]["output_tokens"] == 2 and body["max_output_tokens"] == 2
    assert services.generate_calls[0].max_tokens == 2


def test_function_tool_call_and_its_output_round_trip(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    script_text(services, CALL_TEXT)
    first = create(client, tools=[WEATHER]).json()
    assert '"get_weather"' in rendered(services) and rendered(services).startswith("<tools>")
    (call,) = first["output"]
    assert call["type"] == "function_call" and call["status"] == "completed" and call["id"].startswith("fc_")
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert first["status"] == "completed"
    assert first["tools"] == [{**WEATHER, "strict": None}]
    script_text(services, "Sunny.")
    second = create(
        client,
        previous_response_id=first["id"],
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "18C, sunny"}],
        tools=[WEATHER],
    ).json()
    assert second["output"][0]["content"][0]["text"] == "Sunny."
    assert second["previous_response_id"] == first["id"]
    conversation = services.tokenizers["exo-tiny"].rendered[-1]
    assert [turn["role"] for turn in conversation] == ["user", "assistant", "tool"]
    assert conversation[1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert conversation[2] == {"role": "tool", "content": "18C, sunny", "tool_call_id": call["call_id"]}


def test_function_calls_sent_as_items_join_one_assistant_turn(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    items = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "cold"}]},
        {"type": "function_call_output", "call_id": "c2", "output": "warm"},
    ]
    assert create(client, input=items, tools=[WEATHER]).status_code == 200
    conversation = services.tokenizers["exo-tiny"].rendered[-1]
    assert [turn["role"] for turn in conversation] == ["user", "assistant", "tool", "tool"]
    assert [call["id"] for call in conversation[1]["tool_calls"]] == ["c1", "c2"]
    assert conversation[2]["content"] == "cold"


def test_tool_choice_named_and_none(client: TestClient[Any], services: FakeNodeServices) -> None:
    """A named function is enforced by the chat path's grammar: the model's calls must be JSON
    between markers, as a Hermes-style template's are."""
    services.tokenizers["exo-tiny"].chat_template = "... <tool_call> ..."
    other = {**WEATHER, "name": "get_time"}
    body = create(client, tools=[WEATHER, other], tool_choice={"type": "function", "name": "get_time"}).json()
    assert body["tool_choice"] == {"type": "function", "name": "get_time"}
    assert '"get_time"' in rendered(services) and '"get_weather"' not in rendered(services)
    create(client, tools=[WEATHER], tool_choice="none")
    assert "<tools>" not in rendered(services)


def test_previous_response_id_chains_input_and_output(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    first = create(client, input="one", instructions="first rules").json()
    second = create(client, input="two", previous_response_id=first["id"], instructions="second rules").json()
    # The earlier instructions are not carried over, as OpenAI does.
    assert rendered(services) == "<system>second rules<user>one<assistant>Hello world!<user>two<assistant>"
    create(client, input="three", previous_response_id=second["id"])
    assert (
        rendered(services)
        == "<user>one<assistant>Hello world!<user>two<assistant>Hello world!<user>three<assistant>"
    )


def test_get_delete_and_input_items(client: TestClient[Any], services: FakeNodeServices) -> None:
    created = create(
        client, input=[{"role": "user", "content": "a"}, {"role": "user", "content": "b", "id": "msg_b"}]
    ).json()
    fetched = client.get(f"/v1/responses/{created['id']}")
    assert fetched.status_code == 200 and fetched.json() == created
    items = client.get(f"/v1/responses/{created['id']}/input_items").json()
    assert items["object"] == "list" and items["has_more"] is False
    assert [item["content"][0]["text"] for item in items["data"]] == ["b", "a"]  # newest first
    assert items["first_id"] == "msg_b" and items["data"][0]["type"] == "message"
    page = client.get(
        f"/v1/responses/{created['id']}/input_items", params={"order": "asc", "limit": 1}
    ).json()
    assert [item["content"][0]["text"] for item in page["data"]] == ["a"] and page["has_more"] is True
    after = client.get(
        f"/v1/responses/{created['id']}/input_items", params={"order": "asc", "after": page["last_id"]}
    )
    assert [item["id"] for item in after.json()["data"]] == ["msg_b"]
    assert_error(
        client.get(f"/v1/responses/{created['id']}/input_items", params={"after": "nope"}), 404, "not_found"
    )
    assert_error(
        client.get(f"/v1/responses/{created['id']}/input_items", params={"limit": 0}), 400, param="limit"
    )
    deleted = client.delete(f"/v1/responses/{created['id']}")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": created["id"],
        "object": "response",
        "deleted": True,
    }
    assert_error(client.get(f"/v1/responses/{created['id']}"), 404, "response_not_found")
    assert_error(client.delete(f"/v1/responses/{created['id']}"), 404, "response_not_found")


def test_store_false_keeps_nothing(client: TestClient[Any], services: FakeNodeServices) -> None:
    created = create(client, store=False).json()
    assert created["store"] is False
    assert_error(client.get(f"/v1/responses/{created['id']}"), 404, "response_not_found")
    chained = create(client, previous_response_id=created["id"])
    assert_error(chained, 404, "previous_response_not_found", "previous_response_id")


def test_a_finished_response_cannot_be_cancelled(client: TestClient[Any], services: FakeNodeServices) -> None:
    created = create(client).json()
    assert_error(client.post(f"/v1/responses/{created['id']}/cancel"), 400, "response_not_in_progress")
    assert_error(client.post("/v1/responses/resp_unknown/cancel"), 404, "response_not_found")


def test_text_format_goes_to_the_chat_path(client: TestClient[Any], services: FakeNodeServices) -> None:
    """text.format becomes the chat path's response_format: a grammar the sampling stage enforces;
    a schema the grammar library cannot enforce is refused naming the Responses field."""
    schema = {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}
    for text_format in (schema, {"type": "json_object"}):
        response = create(client, text={"format": text_format})
        assert response.status_code == 200, response.text
        assert response.json()["text"]["format"]["type"] == text_format["type"]
        grammar = services.generate_calls[-1].sampling.grammar
        assert grammar is not None and grammar.trigger == []
    unsupported = {**schema, "schema": {"type": "object", "if": {"type": "object"}}}
    assert_error(create(client, text={"format": unsupported}), 400, "unsupported_schema", "text.format")
    assert create(client, text={"format": {"type": "text"}}).status_code == 200
    assert services.generate_calls[-1].sampling.grammar is None


# --- streaming --------------------------------------------------------------------------------


def test_stream_sends_the_typed_event_sequence(client: TestClient[Any], services: FakeNodeServices) -> None:
    events = stream_events(create(client, stream=True))
    types = [event["type"] for event in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    assert events[2]["item"] == {
        "id": item_id,
        "status": "in_progress",
        "content": [],
        "role": "assistant",
        "type": "message",
    }
    assert all(event["item_id"] == item_id for event in events[3:-2] if "item_id" in event)
    assert "".join(event["delta"] for event in events if "delta" in event) == "Hello world!"
    assert events[-4]["text"] == "Hello world!"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"] == [events[-2]["item"]]
    assert final["usage"]["output_tokens"] == 5
    assert client.get(f"/v1/responses/{final['id']}").json() == final


def test_stream_of_a_tool_call(client: TestClient[Any], services: FakeNodeServices) -> None:
    script_text(services, "Let me check." + CALL_TEXT)
    events = stream_events(create(client, stream=True, tools=[WEATHER]))
    types = [event["type"] for event in events]
    call_start = types.index("response.function_call_arguments.delta") - 1
    assert types[call_start:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert types[call_start - 1] == "response.output_item.done"  # the text message closes first
    added, done = events[call_start], events[-2]
    assert added["output_index"] == done["output_index"] == 1
    assert added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"
    assert json.loads(events[call_start + 2]["arguments"]) == {"city": "Paris"}
    assert events[call_start + 2]["name"] == "get_weather"
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["message", "function_call"]


def test_stream_cut_by_max_output_tokens_ends_incomplete(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    events = stream_events(create(client, stream=True, max_output_tokens=1))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_stream_failure_ends_with_response_failed(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    services.script = [1000, GenerationAborted("i-1", "stage 1 went away")]
    events = stream_events(create(client, stream=True))
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "stage 1 went away" in failed["error"]["message"]
    assert failed["error"]["code"] == "server_error"
    assert client.get(f"/v1/responses/{failed['id']}").json()["status"] == "failed"


def test_whole_answer_failure_is_a_500(client: TestClient[Any], services: FakeNodeServices) -> None:
    services.script = [1000, GenerationAborted("i-1", "stage 1 went away")]
    assert_error(create(client), 500, "generation_failed")


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"input": ""}, 400, "invalid_request", "input"),
        ({"input": []}, 400, "invalid_request", "input"),
        ({"input": None}, 400, "invalid_request", "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, 400, "invalid_request", "input"),
        ({"input": [{"type": "input_audio"}]}, 400, "unsupported_input_item", "input[0].type"),
        ({"input": [{"content": "no role"}]}, 400, "unsupported_input_item", "input[0].type"),
        (
            {"input": [{"type": "item_reference", "id": "msg_1"}]},
            400,
            "unsupported_input_item",
            "input[0].type",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, 400, "invalid_request", "input[0].role"),
        ({"input": [{"role": "user"}]}, 400, "invalid_request", "input[0].content"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "unsupported_content",
            "input[0].content[0]",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "bogus"}]}]},
            400,
            "invalid_request",
            "input[0].content[0].type",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
            400,
            "invalid_request",
            "input[0].arguments",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "zz", "output": "x"}]},
            400,
            "invalid_request",
            "input[0].call_id",
        ),
        ({"tools": [{"type": "web_search"}]}, 400, "unsupported_tool", "tools[0].type"),
        ({"tools": [{"type": "function"}]}, 400, "invalid_request", "tools[0].name"),
        ({"tool_choice": {"type": "file_search"}}, 400, "unsupported_tool_choice", "tool_choice"),
        (
            {"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]},
            400,
            "invalid_request",
            "tool_choice",
        ),
        ({"tool_choice": "required"}, 400, "invalid_request", "tool_choice"),
        ({"tool_choice": "sometimes"}, 400, "invalid_request", "tool_choice"),
        (
            {"text": {"format": {"type": "json_schema", "schema": {}}}},
            400,
            "invalid_request",
            "text.format.name",
        ),
        ({"text": {"format": {"type": "xml"}}}, 400, "invalid_request", "text.format.type"),
        ({"max_output_tokens": 0}, 400, "invalid_request", "max_output_tokens"),
        ({"temperature": 3}, 400, "invalid_request", "temperature"),
        ({"top_p": 0}, 400, "invalid_request", "top_p"),
        ({"metadata": {"k": "v" * 513}}, 400, "invalid_request", "metadata"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "invalid_request", "metadata"),
        ({"background": True}, 400, "unsupported_parameter", "background"),
        (
            {"previous_response_id": "resp_missing"},
            404,
            "previous_response_not_found",
            "previous_response_id",
        ),
        ({"model": "no-such-model"}, 404, "model_not_found", "model"),
        ({"model": ""}, 400, "invalid_request", "model"),
    ],
)
def test_bad_requests(
    client: TestClient[Any], body: dict[str, Any], status: int, code: str, param: str
) -> None:
    assert_error(create(client, **body), status, code, param)


def test_missing_input_and_malformed_json(client: TestClient[Any]) -> None:
    assert_error(client.post("/v1/responses", json={"model": "exo-tiny"}), 400, "invalid_request", "input")
    assert_error(
        client.post("/v1/responses", content=b"{not json", headers={"content-type": "application/json"}), 400
    )


def test_context_limits_name_the_responses_fields(
    client: TestClient[Any], services: FakeNodeServices, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 40}))
    services.model_infos = [msgspec.structs.replace(model_info("exo-tiny", [1000] * 8), path=str(tmp_path))]
    assert_error(create(client, input="x" * 60), 400, "context_length_exceeded", "input")
    assert_error(create(client, max_output_tokens=30), 400, "context_length_exceeded", "max_output_tokens")
    assert services.generate_calls == []


def test_bad_ids_on_the_id_routes(client: TestClient[Any]) -> None:
    assert_error(client.get("/v1/responses/bad%20id"), 400)
    assert_error(client.get("/v1/responses/resp_nope"), 404, "response_not_found", "response_id")


def test_logprobs_with_include(client: TestClient[Any], services: FakeNodeServices) -> None:
    include = ["message.output_text.logprobs"]
    body = create(client, include=include, top_logprobs=2).json()
    assert services.generate_calls[0].sampling.logprobs
    assert services.generate_calls[0].sampling.top_logprobs == 2
    part = body["output"][0]["content"][0]
    assert "".join(entry["token"] for entry in part["logprobs"]) == part["text"] == "Hello world!"
    assert [len(entry["top_logprobs"]) for entry in part["logprobs"]] == [2] * 5
    assert body["top_logprobs"] == 2
    events = stream_events(create(client, include=include, stream=True))
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert all("".join(entry["token"] for entry in delta["logprobs"]) == delta["delta"] for delta in deltas)
    done = next(event for event in events if event["type"] == "response.output_text.done")
    assert [entry["token"] for entry in done["logprobs"]] == ["Hel", "lo", " wo", "rld", "!"]
    plain = create(client, top_logprobs=2).json()  # without include: none, as OpenAI
    assert plain["output"][0]["content"][0]["logprobs"] == []
    assert not services.generate_calls[-1].sampling.logprobs


def test_reasoning_becomes_a_reasoning_item_before_the_message() -> None:
    """Thinking separated by the chat path (models with thinking markers) is a `reasoning` output
    item with its own typed deltas, closed before the answer's message opens."""
    body = msgspec.json.decode(b'{"model": "exo-tiny", "input": "hi"}', type=ResponsesRequest)
    builder = ResponseBuilder("resp_1", body, translate(body, None), created_at=0)
    events = builder.start()
    for event in (ReasoningDelta("It is "), ReasoningDelta("sunny."), TextDelta("Sunny.")):
        events += builder.feed(event)
    events += builder.finish(ChoiceEnded("stop"), Usage(3, 4, 7), cancelled=False)
    documents = [msgspec.to_builtins(event) for event in events]
    assert [document["type"] for document in documents] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [document["sequence_number"] for document in documents] == list(range(len(documents)))
    assert documents[5]["text"] == "It is sunny."
    output = documents[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["reasoning", "message"]
    assert output[0]["content"] == [{"type": "reasoning_text", "text": "It is sunny."}]
    assert output[1]["content"][0]["text"] == "Sunny."
    # A chained response continues from the answer; the thinking is not rendered again.
    assert [message.content for message in builder.conversation()][-1] == "Sunny."
