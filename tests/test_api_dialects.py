"""Claude Messages and Ollama over a fake node: request translation, answer shapes, streams, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from litestar.testing import TestClient

from exo.api.cluster_port import GenerationAborted, NoCapacity
from exo.api.completion import CompletionSettings
from exo.core.events import ShardAssignment
from exo.core.state import Instance, State
from tests.harness.api_checks import assert_claude_error
from tests.harness.fakes import FakeNodeServices, FakeTokenizer


@pytest.fixture(scope="module")
def completion_settings() -> CompletionSettings:
    return CompletionSettings(default_max_tokens=256)


HEADERS = {"anthropic-version": "2023-06-01"}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CLAUDE_TOOL = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def script_text(services: FakeNodeServices, text: str) -> None:
    services.tokenizers["exo-tiny"] = FakeTokenizer()
    services.script = [ord(character) for character in text]


def prompt_text(services: FakeNodeServices) -> str:
    return "".join(chr(token) for token in services.generate_calls[-1].prompt_tokens)


# --- Claude ----------------------------------------------------------------------------------


def claude(client: TestClient[Any], headers: dict[str, str] | None = None, **body: Any) -> Any:
    request = {"model": "exo-tiny", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **body}
    return client.post("/v1/messages", json=request, headers=HEADERS if headers is None else headers)


def claude_events(response: Any) -> list[tuple[str, dict[str, Any]]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events: list[tuple[str, dict[str, Any]]] = []
    for block in response.text.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        name, data = name_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    return events


def test_claude_message(client: TestClient[Any], services: FakeNodeServices) -> None:
    body = claude(client, system="be brief").json()
    assert body["id"].startswith("msg_")
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == "exo-tiny"
    assert body["content"] == [{"type": "text", "text": "Hello world!"}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"] == {"input_tokens": len("<system>be brief<user>hi<assistant>"), "output_tokens": 5}
    assert prompt_text(services) == "<system>be brief<user>hi<assistant>"


@pytest.mark.parametrize(
    ("extra", "stop_reason", "stop_sequence", "text"),
    [
        ({"max_tokens": 2}, "max_tokens", None, "Hello"),
        ({"stop_sequences": ["wor"]}, "stop_sequence", "wor", "Hello "),
    ],
)
def test_claude_stop_reasons(
    client: TestClient[Any], extra: dict[str, Any], stop_reason: str, stop_sequence: str | None, text: str
) -> None:
    body = claude(client, **extra).json()
    assert (body["stop_reason"], body["stop_sequence"], body["content"][0]["text"]) == (
        stop_reason,
        stop_sequence,
        text,
    )


def test_claude_stream_events(client: TestClient[Any]) -> None:
    events = claude_events(claude(client, stream=True))
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names[-3] == "content_block_stop"
    assert set(names[2:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == "Hello world!"
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"output_tokens": 5}


def test_claude_tool_use(client: TestClient[Any], services: FakeNodeServices) -> None:
    script_text(services, "Checking. " + CALL_TEXT)
    body = claude(client, tools=[CLAUDE_TOOL], max_tokens=200).json()
    assert '"parameters": {"type": "object"' in prompt_text(services)  # input_schema rendered as parameters
    assert body["stop_reason"] == "tool_use"
    text, tool_use = body["content"]
    assert text == {"type": "text", "text": "Checking. "}
    assert tool_use["type"] == "tool_use" and tool_use["id"].startswith("toolu_")
    assert (tool_use["name"], tool_use["input"]) == ("get_weather", {"city": "Paris"})
    events = claude_events(claude(client, tools=[CLAUDE_TOOL], max_tokens=200, stream=True))
    starts = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert [block["type"] for block in starts] == ["text", "tool_use"]
    partial = [data["delta"] for name, data in events if name == "content_block_delta" and data["index"] == 1]
    assert json.loads("".join(delta["partial_json"] for delta in partial)) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_claude_tool_history_and_system_blocks(client: TestClient[Any], services: FakeNodeServices) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]
    system = [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]
    assert claude(client, messages=messages, system=system, tools=[CLAUDE_TOOL]).status_code == 200
    rendered = services.tokenizers["exo-tiny"].rendered[-1]
    assert rendered[0] == {"role": "system", "content": "be brief"}
    assert rendered[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert rendered[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}


def test_claude_forced_tool(client: TestClient[Any], services: FakeNodeServices) -> None:
    script_text(services, CALL_TEXT)
    services.tokenizers["exo-tiny"].chat_template = "<tool_call>"
    body = claude(
        client, tools=[CLAUDE_TOOL], tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=200
    ).json()
    assert body["content"][-1]["input"] == {"city": "Paris"}
    grammar = services.generate_calls[0].sampling.grammar
    assert grammar is not None and not grammar.trigger and '"const": "get_weather"' in grammar.lark


def test_claude_tool_choice_any_and_structured_output(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    script_text(services, CALL_TEXT)
    services.tokenizers["exo-tiny"].chat_template = "<tool_call>"
    body = claude(client, tools=[CLAUDE_TOOL], tool_choice={"type": "any"}, max_tokens=200).json()
    assert body["stop_reason"] == "tool_use"
    grammar = services.generate_calls[-1].sampling.grammar
    assert grammar is not None and not grammar.trigger
    script_text(services, '{"a": 1}')
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    output_config = {"format": {"type": "json_schema", "schema": schema}}
    body = claude(client, output_config=output_config).json()
    assert body["content"][0]["text"] == '{"a": 1}'
    grammar = services.generate_calls[-1].sampling.grammar
    assert grammar is not None and '"lenient": false' in grammar.lark  # Claude's are always strict


@pytest.mark.parametrize(
    ("change", "status_code", "error_type", "text"),
    [
        ({"headers": {}}, 400, "invalid_request_error", "anthropic-version"),
        ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
        ({"model": "nope"}, 404, "not_found_error", "nope"),
        ({"messages": []}, 400, "invalid_request_error", "messages"),
        ({"temperature": 1.5}, 400, "invalid_request_error", "temperature"),
        (
            {"output_config": {"format": {"type": "json_schema"}}},
            400,
            "invalid_request_error",
            "output_config.format",
        ),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object", "if": {}}}}},
            400,
            "invalid_request_error",
            "Unimplemented keys",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]},
            400,
            "invalid_request_error",
            "image",
        ),
        ({"tool_choice": {"type": "any"}}, 400, "invalid_request_error", "needs tools"),
    ],
)
def test_claude_errors(
    client: TestClient[Any], change: dict[str, Any], status_code: int, error_type: str, text: str
) -> None:
    headers = change.pop("headers", None)
    body = {"model": "exo-tiny", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **change}
    body = {key: value for key, value in body.items() if value is not None}
    response = client.post("/v1/messages", json=body, headers=HEADERS if headers is None else headers)
    assert text in assert_claude_error(response, status_code, error_type)


def test_claude_no_capacity_and_stage_failure(client: TestClient[Any], services: FakeNodeServices) -> None:
    services.ensure_error = NoCapacity("exo-tiny", ["node0: short by 1 GiB"])
    assert "short by 1 GiB" in assert_claude_error(claude(client), 503, "overloaded_error")
    services.ensure_error = None
    services.script = [1000, GenerationAborted("i-1", "stage gone")]
    events = claude_events(claude(client, stream=True))
    assert events[-1][0] == "error" and "stage gone" in events[-1][1]["error"]["message"]


# --- Ollama ----------------------------------------------------------------------------------


def ndjson(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def ollama_chat(client: TestClient[Any], **body: Any) -> Any:
    request = {"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}], **body}
    return client.post("/ollama/api/chat", json=request)


def test_ollama_chat_streams_ndjson_by_default(client: TestClient[Any], services: FakeNodeServices) -> None:
    lines = ndjson(ollama_chat(client, options={"temperature": 0, "num_predict": 50, "seed": 3}))
    assert all(line["model"] == "exo-tiny" and line["created_at"].endswith("Z") for line in lines)
    assert all(not line["done"] and line["message"]["role"] == "assistant" for line in lines[:-1])
    assert "".join(line["message"]["content"] for line in lines) == "Hello world!"
    final = lines[-1]
    assert final["done"] and final["done_reason"] == "stop"
    assert final["prompt_eval_count"] == len("<user>hi<assistant>") and final["eval_count"] == 5
    assert final["total_duration"] >= final["eval_duration"] >= 0
    call = services.generate_calls[0]
    assert (call.sampling.temperature, call.sampling.seed, call.max_tokens) == (0.0, 3, 50)


def test_ollama_defaults_and_non_streaming(client: TestClient[Any], services: FakeNodeServices) -> None:
    body = ollama_chat(client, stream=False, model="exo-tiny:latest").json()
    assert body["message"] == {"role": "assistant", "content": "Hello world!"}
    assert body["done"] and body["done_reason"] == "stop" and body["model"] == "exo-tiny:latest"
    sampling = services.generate_calls[0].sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.8, 40, 0.9)  # Ollama's defaults


def test_ollama_tool_calls(client: TestClient[Any], services: FakeNodeServices) -> None:
    script_text(services, CALL_TEXT)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = ollama_chat(client, stream=False, tools=tools).json()
    assert body["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}, "index": 0}}
    ]
    lines = ndjson(ollama_chat(client, tools=tools))
    assert [line["message"].get("tool_calls") for line in lines if line["message"].get("tool_calls")] == [
        body["message"]["tool_calls"]
    ]


def test_ollama_generate(client: TestClient[Any], services: FakeNodeServices) -> None:
    body = client.post(
        "/ollama/api/generate", json={"model": "exo-tiny", "prompt": "hi", "system": "sys", "stream": False}
    ).json()
    assert body["response"] == "Hello world!" and body["done"]
    assert prompt_text(services) == "<system>sys<user>hi<assistant>"
    lines = ndjson(
        client.post("/ollama/api/generate", json={"model": "exo-tiny", "prompt": "raw text", "raw": True})
    )
    assert "".join(line["response"] for line in lines) == "Hello world!"
    assert prompt_text(services) == "raw text"


def test_ollama_empty_request_loads_the_model(client: TestClient[Any], services: FakeNodeServices) -> None:
    body = client.post("/ollama/api/generate", json={"model": "exo-tiny"}).json()
    assert (body["done"], body["done_reason"], body["response"]) == (True, "load", "")
    body = client.post("/ollama/api/chat", json={"model": "exo-tiny", "messages": []}).json()
    assert (body["done"], body["done_reason"]) == (True, "load")
    assert services.generate_calls == []
    assert len(services.ensure_timeouts) == 2


def test_ollama_model_routes(client: TestClient[Any], services: FakeNodeServices) -> None:
    assert client.get("/ollama").text == "Ollama is running"
    assert client.get("/ollama/api/version").json()["version"]
    (listed,) = client.get("/ollama/api/tags").json()["models"]
    assert listed["name"] == listed["model"] == "exo-tiny:latest"
    assert listed["size"] == 8000 and listed["details"]["family"] == "llama" and len(listed["digest"]) == 64
    assert client.get("/ollama/api/ps").json() == {"models": []}
    services.current_state = State(
        instances={
            "i-1": Instance("i-1", "exo-tiny", "Pipeline", "ready", {"node0": ShardAssignment(0, 8, 8)})
        }
    )
    (running,) = client.get("/ollama/api/ps").json()["models"]
    assert running["name"] == "exo-tiny:latest"
    shown = client.post("/ollama/api/show", json={"model": "exo-tiny"}).json()
    assert shown["template"] == "<fake template>"
    assert shown["model_info"]["general.architecture"] == "llama"
    assert shown["model_info"]["llama.block_count"] == 8
    assert shown["capabilities"] == ["completion"]


@pytest.mark.parametrize(
    ("path", "body", "status_code", "text"),
    [
        ("/ollama/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "nope"),
        (
            "/ollama/api/chat",
            {"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}], "format": "xml"},
            400,
            "format",
        ),
        (
            "/ollama/api/chat",
            {"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}], "think": "extreme"},
            400,
            "think",
        ),
        (
            "/ollama/api/chat",
            {"model": "exo-tiny", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]},
            400,
            "images",
        ),
        ("/ollama/api/chat", {"messages": []}, 400, "model"),
        (
            "/ollama/api/generate",
            {"model": "exo-tiny", "prompt": "x", "options": {"temperature": "hot"}},
            400,
            "temperature",
        ),
        ("/ollama/api/generate", {"model": "exo-tiny", "prompt": "x", "context": [1, 2]}, 400, "context"),
        ("/ollama/api/show", {"model": "nope"}, 404, "nope"),
        ("/ollama/api/show", {}, 400, "model"),
    ],
)
def test_ollama_errors(
    client: TestClient[Any], path: str, body: dict[str, Any], status_code: int, text: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status_code, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and text in error


def test_ollama_stage_failure_mid_stream(client: TestClient[Any], services: FakeNodeServices) -> None:
    services.script = [1000, GenerationAborted("i-1", "stage gone")]
    lines = ndjson(ollama_chat(client))
    assert "stage gone" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines)


@pytest.mark.parametrize(
    ("format_", "expected"),
    [
        ("json", '%json {"type": "object"'),
        (
            {"type": "object", "properties": {"a": {"type": "integer"}}},
            '%json {"type": "object", "properties"',
        ),
    ],
)
def test_ollama_format_becomes_a_grammar(
    client: TestClient[Any], services: FakeNodeServices, format_: Any, expected: str
) -> None:
    script_text(services, '{"a": 1}')
    for path, extra in (
        ("/ollama/api/chat", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/ollama/api/generate", {"prompt": "hi"}),
    ):
        body = {"model": "exo-tiny", "stream": False, "format": format_, **extra}
        assert client.post(path, json=body).status_code == 200
        grammar = services.generate_calls[-1].sampling.grammar
        assert grammar is not None and grammar.lark.startswith(f"start: {expected}")


@pytest.mark.parametrize(
    ("think", "claude_thinking", "options"),
    [
        (False, {"type": "disabled"}, {"enable_thinking": False}),
        (True, {"type": "enabled", "budget_tokens": 1024}, {"enable_thinking": True}),
    ],
)
def test_think_flags_become_template_variables(
    client: TestClient[Any], services: FakeNodeServices, think: bool, claude_thinking: Any, options: Any
) -> None:
    script_text(services, "hi")
    chat = {
        "model": "exo-tiny",
        "stream": False,
        "think": think,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert client.post("/ollama/api/chat", json=chat).status_code == 200
    assert services.tokenizers["exo-tiny"].template_options[-1] == options
    assert claude(client, thinking=claude_thinking).status_code == 200
    assert services.tokenizers["exo-tiny"].template_options[-1] == options
