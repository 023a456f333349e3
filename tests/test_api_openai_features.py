"""OpenAI chat and text completions over a fake node: n, logprobs, sampling fields, tools,
response_format, context length, legacy completions, cancellation."""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from exo.api import runs
from exo.api.completion import CompletionSettings
from exo.api.openai_chat import chat_completion_stream, chat_request
from exo.api.openai_types import ChatCompletionRequest
from exo.api.runs import ActiveCompletions, CompletionRun
from exo.core.sampling import SamplingParams
from tests.harness.api_checks import assert_error, sse_events, wait_until_generation_ends
from tests.harness.fakes import FakeNodeServices, FakeTokenizer, model_info


@pytest.fixture(scope="module")
def completion_settings() -> CompletionSettings:
    return CompletionSettings(default_max_tokens=256)


USER_HI = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def tokens_of(tokenizer: FakeTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def chat(client: TestClient[Any], **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "exo-tiny", "messages": USER_HI, **body})


def stream_chunks(response: Any) -> list[dict[str, Any]]:
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    return events[:-1]


# --- n, seeds, sampling fields -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_are_indexed_and_seeded_apart(
    client: TestClient[Any], services: FakeNodeServices, stream: bool
) -> None:
    response = chat(client, n=3, seed=7, stream=stream)
    if stream:
        chunks = stream_chunks(response)
        texts = {index: "" for index in range(3)}
        finishes: dict[int, str] = {}
        for chunk in chunks:
            (choice,) = chunk["choices"]
            texts[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"] is not None:
                finishes[choice["index"]] = choice["finish_reason"]
        assert texts == {0: "Hello world!", 1: "Hello world!", 2: "Hello world!"}
        assert finishes == {0: "stop", 1: "stop", 2: "stop"}
        roles = [chunk["choices"][0]["index"] for chunk in chunks if chunk["choices"][0]["delta"].get("role")]
        assert roles == [0, 1, 2]
    else:
        body = response.json()
        assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
        assert {choice["message"]["content"] for choice in body["choices"]} == {"Hello world!"}
        assert body["usage"]["completion_tokens"] == 15  # every choice's tokens
    assert sorted(call.sampling.seed or 0 for call in services.generate_calls) == [7, 8, 9]


def test_sampling_fields_reach_the_runner(client: TestClient[Any], services: FakeNodeServices) -> None:
    response = chat(
        client,
        temperature=0.3,
        top_p=0.8,
        top_k=20,
        min_p=0.05,
        seed=1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias={"5": -100, "7": 2.5},
        user="someone",
        metadata={"any": "thing"},
    )
    assert response.status_code == 200, response.text
    assert services.generate_calls[0].sampling == SamplingParams(
        temperature=0.3,
        top_p=0.8,
        top_k=20,
        seed=1,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias={5: -100.0, 7: 2.5},
    )


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"top_logprobs": 2}, "top_logprobs", "invalid_request"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_request"),
        ({"logprobs": "yes"}, "logprobs", "invalid_request"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_request"),
        ({"min_p": 1.5}, "min_p", "invalid_request"),
        ({"presence_penalty": 2.5}, "presence_penalty", "invalid_request"),
        ({"repetition_penalty": 0}, "repetition_penalty", "invalid_request"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "invalid_request"),
        ({"logit_bias": {"1": 101}}, "logit_bias", "invalid_request"),
        ({"logit_bias": {"999999": 1}}, "logit_bias", "invalid_request"),  # beyond the vocabulary
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "invalid_request"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}},
            "response_format.json_schema.schema",
            "invalid_request",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}},
            "response_format.json_schema.strict",
            "invalid_request",
        ),
        (  # strict: a keyword the grammar library does not implement is refused, not ignored
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "strict": True, "schema": {"type": "object", "if": {}}},
                }
            },
            "response_format.json_schema.schema",
            "unsupported_schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "response_format.json_schema.schema",
            "unsupported_schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_request"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort", "invalid_request"),
        ({"tool_choice": "required"}, "tool_choice", "invalid_request"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER_TOOL]},
            "tool_choice",
            "invalid_request",
        ),
        ({"tool_choice": "sometimes", "tools": [WEATHER_TOOL]}, "tool_choice", "invalid_request"),
        (
            {"tools": [{"type": "function", "function": {"description": "no name"}}]},
            "tools[0].function.name",
            "invalid_request",
        ),
    ],
)
def test_inconsistent_or_unsupported_fields_are_400(
    client: TestClient[Any], services: FakeNodeServices, extra: dict[str, Any], param: str, code: str
) -> None:
    assert_error(chat(client, **extra), 400, code, param)
    assert services.generate_calls == []


def test_response_format_text_is_fine(client: TestClient[Any]) -> None:
    assert chat(client, response_format={"type": "text"}).status_code == 200


# --- logprobs --------------------------------------------------------------------------------


def test_logprobs_join_to_the_content(client: TestClient[Any]) -> None:
    body = chat(client, logprobs=True, top_logprobs=3).json()
    (choice,) = body["choices"]
    entries = choice["logprobs"]["content"]
    assert "".join(entry["token"] for entry in entries) == choice["message"]["content"] == "Hello world!"
    for entry in entries:
        assert entry["logprob"] <= 0
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert len(entry["top_logprobs"]) == 3
        assert all(top["logprob"] <= 0 and isinstance(top["bytes"], list) for top in entry["top_logprobs"])


def test_logprobs_stream_and_stop_string(client: TestClient[Any]) -> None:
    chunks = stream_chunks(chat(client, logprobs=True, stop="o w", stream=True))
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    tokens = [
        entry["token"]
        for chunk in chunks
        if (logprobs := chunk["choices"][0]["logprobs"])
        for entry in logprobs["content"]
    ]
    assert text == "Hell" == "".join(tokens)
    assert tokens == ["Hel", "l"]


def test_no_logprobs_unless_asked(client: TestClient[Any]) -> None:
    assert chat(client).json()["choices"][0]["logprobs"] is None


# --- tools -----------------------------------------------------------------------------------


def script_text(services: FakeNodeServices, text: str) -> None:
    services.tokenizers["exo-tiny"] = FakeTokenizer()
    services.script = [ord(character) for character in text]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_comes_back_as_tool_calls(
    client: TestClient[Any], services: FakeNodeServices, stream: bool
) -> None:
    script_text(services, CALL_TEXT)
    response = chat(client, tools=[WEATHER_TOOL], stream=stream)
    prompt = "".join(chr(token) for token in services.generate_calls[0].prompt_tokens)
    assert prompt.startswith("<tools>") and '"get_weather"' in prompt  # rendered by the template
    if not stream:
        (choice,) = response.json()["choices"]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        return
    chunks = stream_chunks(response)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    calls = [delta["tool_calls"] for delta in deltas if "tool_calls" in delta]
    assert calls[0] == [
        {
            "index": 0,
            "id": calls[0][0]["id"],
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
    ]
    arguments = "".join(call[0]["function"].get("arguments", "") for call in calls)
    assert json.loads(arguments) == {"city": "Paris"}
    assert all(call[0]["index"] == 0 for call in calls)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(delta.get("content") for delta in deltas)


def test_tool_choice_none_does_not_render_tools(client: TestClient[Any], services: FakeNodeServices) -> None:
    script_text(services, CALL_TEXT)
    body = chat(client, tools=[WEATHER_TOOL], tool_choice="none").json()
    prompt = "".join(chr(token) for token in services.generate_calls[0].prompt_tokens)
    assert "<tools>" not in prompt
    assert body["choices"][0]["message"]["content"] == CALL_TEXT  # no parsing either
    assert body["choices"][0]["finish_reason"] == "stop"


def test_named_tool_choice_renders_only_that_tool_and_forces_the_call(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    script_text(services, CALL_TEXT)
    services.tokenizers["exo-tiny"].chat_template = "... <tool_call> ..."  # a Hermes-style template
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = chat(client, tools=[TIME_TOOL, WEATHER_TOOL], tool_choice=choice).json()
    prompt = "".join(chr(token) for token in services.generate_calls[0].prompt_tokens)
    assert '"get_weather"' in prompt and '"get_time"' not in prompt
    grammar = services.generate_calls[0].sampling.grammar
    assert grammar is not None and not grammar.trigger  # the whole answer is the call
    assert '"const": "get_weather"' in grammar.lark and "get_time" not in grammar.lark
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert body["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "whole", "then"),
    [
        ("auto", None, False, "free"),
        ("auto", False, False, "end"),
        ("required", None, True, None),
        ("required", False, True, None),
    ],
)
def test_tool_choice_becomes_a_grammar(
    client: TestClient[Any],
    services: FakeNodeServices,
    *,
    tool_choice: str,
    parallel: bool | None,
    whole: bool,
    then: str | None,
) -> None:
    """`required` constrains the whole answer to calls; `auto` leaves it free until the model opens a
    call, whose JSON must then match a declared tool; parallel_tool_calls false allows one call."""
    script_text(services, CALL_TEXT)
    services.tokenizers["exo-tiny"].chat_template = "... <tool_call> ..."
    extra: dict[str, Any] = {} if parallel is None else {"parallel_tool_calls": parallel}
    assert chat(client, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=tool_choice, **extra).status_code == 200
    grammar = services.generate_calls[0].sampling.grammar
    assert grammar is not None
    assert '"const": "get_weather"' in grammar.lark and '"const": "get_time"' in grammar.lark
    assert bool(grammar.trigger) is not whole
    if then is not None:
        assert grammar.then == then
    else:
        assert ('call ("\\n" call)*' in grammar.lark) is (parallel is None)


def test_tool_choice_none_sends_no_grammar(client: TestClient[Any], services: FakeNodeServices) -> None:
    script_text(services, CALL_TEXT)
    services.tokenizers["exo-tiny"].chat_template = "... <tool_call> ..."
    assert chat(client, tools=[WEATHER_TOOL], tool_choice="none").status_code == 200
    assert services.generate_calls[0].sampling.grammar is None


def test_forced_tool_choice_on_a_format_without_a_grammar_is_400(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    """A template whose calls are not JSON between markers: "required" cannot be enforced, so it is
    refused rather than hoped for; "auto" still works (parsed, not constrained)."""
    script_text(services, "hi")
    services.tokenizers["exo-tiny"].chat_template = "[TOOL_CALLS]"
    assert_error(
        chat(client, tools=[WEATHER_TOOL], tool_choice="required"),
        400,
        "unsupported_tool_choice",
        "tool_choice",
    )
    assert chat(client, tools=[WEATHER_TOOL]).status_code == 200
    assert services.generate_calls[-1].sampling.grammar is None


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, '%json {"type": "object"'),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": {"type": "array"}, "strict": True},
            },
            '%json {"type": "array"',
        ),
    ],
)
def test_response_format_becomes_a_grammar(
    client: TestClient[Any], services: FakeNodeServices, response_format: dict[str, Any], expected: str | None
) -> None:
    script_text(services, "{}")
    assert chat(client, response_format=response_format).status_code == 200
    grammar = services.generate_calls[0].sampling.grammar
    if expected is None:
        assert grammar is None
    else:
        assert grammar is not None and grammar.lark.startswith(f"start: {expected}")
        assert '"lenient": false' in grammar.lark  # strict (json_object has no schema to relax)


def test_parallel_tool_calls_false_keeps_one(client: TestClient[Any], services: FakeNodeServices) -> None:
    script_text(services, CALL_TEXT + CALL_TEXT.replace("get_weather", "get_time"))
    body = chat(client, tools=[WEATHER_TOOL, TIME_TOOL], parallel_tool_calls=False).json()
    assert [call["function"]["name"] for call in body["choices"][0]["message"]["tool_calls"]] == [
        "get_weather"
    ]
    body = chat(client, tools=[WEATHER_TOOL, TIME_TOOL]).json()
    assert [call["function"]["name"] for call in body["choices"][0]["message"]["tool_calls"]] == [
        "get_weather",
        "get_time",
    ]


def test_tools_on_a_template_that_ignores_them_is_400(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    services.tokenizers["exo-tiny"].renders_tools = False
    message = assert_error(chat(client, tools=[WEATHER_TOOL]), 400, "tools_unsupported", "tools")
    assert "does not render tools" in message


def test_tool_history_reaches_the_template(client: TestClient[Any], services: FakeNodeServices) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    response = client.post(
        "/v1/chat/completions", json={"model": "exo-tiny", "messages": messages, "tools": [WEATHER_TOOL]}
    )
    assert response.status_code == 200, response.text
    rendered = services.tokenizers["exo-tiny"].rendered[-1]
    assert rendered[0] == {"role": "system", "content": "be brief"}
    assert rendered[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert rendered[3] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


# --- context length --------------------------------------------------------------------------


@pytest.fixture
def short_context(services: FakeNodeServices, tmp_path: Path) -> FakeNodeServices:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 40}))
    services.model_infos = [msgspec.structs.replace(model_info("exo-tiny", [1000] * 8), path=str(tmp_path))]
    return services


def test_prompt_longer_than_the_context_is_400(
    client: TestClient[Any], short_context: FakeNodeServices
) -> None:
    long = [{"role": "user", "content": "x" * 60}]
    response = client.post("/v1/chat/completions", json={"model": "exo-tiny", "messages": long})
    message = assert_error(response, 400, "context_length_exceeded", "messages")
    assert "maximum context length is 40 tokens" in message
    assert short_context.generate_calls == []


def test_max_tokens_past_the_context_is_400_and_the_default_fits(
    client: TestClient[Any], short_context: FakeNodeServices
) -> None:
    prompt_length = len("<user>hi<assistant>")
    message = assert_error(chat(client, max_tokens=30), 400, "context_length_exceeded", "max_tokens")
    assert f"{prompt_length + 30} tokens" in message
    assert_error(
        chat(client, max_completion_tokens=30), 400, "context_length_exceeded", "max_completion_tokens"
    )
    assert chat(client).status_code == 200
    assert short_context.generate_calls[0].max_tokens == 40 - prompt_length


# --- legacy text completions -----------------------------------------------------------------


def complete(client: TestClient[Any], **body: Any) -> Any:
    return client.post("/v1/completions", json={"model": "exo-tiny", "prompt": "Say:", **body})


def test_text_completion(client: TestClient[Any], services: FakeNodeServices) -> None:
    body = complete(client).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [
        {"text": "Hello world!", "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert services.generate_calls[0].prompt_tokens == [ord(character) for character in "Say:"]  # no template
    assert services.generate_calls[0].max_tokens == 16  # OpenAI's default here


def test_text_completion_stream_echo_and_usage(client: TestClient[Any]) -> None:
    chunks = stream_chunks(complete(client, stream=True, echo=True, stream_options={"include_usage": True}))
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
    assert text == "Say:Hello world!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_text_completion_logprobs(client: TestClient[Any]) -> None:
    logprobs = complete(client, logprobs=2, max_tokens=3).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["Hel", "lo", " wo"]
    assert logprobs["text_offset"] == [0, 3, 5]
    assert all(value <= 0 for value in logprobs["token_logprobs"])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])


def test_text_completion_token_prompt(client: TestClient[Any], services: FakeNodeServices) -> None:
    assert complete(client, prompt=[65, 66]).status_code == 200
    assert complete(client, prompt=[[67]]).status_code == 200
    assert [call.prompt_tokens for call in services.generate_calls] == [[65, 66], [67]]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logprobs": 21}, "logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_text_completion_bad_requests(client: TestClient[Any], extra: dict[str, Any], param: str) -> None:
    assert_error(complete(client, **extra), 400, "invalid_request", param)


# --- cancellation ----------------------------------------------------------------------------


async def make_run(services: FakeNodeServices, registry: ActiveCompletions, **body: Any) -> CompletionRun:
    from exo.api.completion import prepare

    request = msgspec.convert({"model": "exo-tiny", "messages": USER_HI, **body}, ChatCompletionRequest)
    prepared, tokenizer = await prepare(services, chat_request(request), CompletionSettings())
    return CompletionRun(services, prepared, tokenizer, registry=registry)


async def test_cancel_by_id_ends_every_choice_and_the_generations() -> None:
    services = FakeNodeServices()
    services.script = [ord(character) for character in "a long answer " * 20]
    registry = ActiveCompletions()
    run = await make_run(services, registry, n=2)
    chunks: list[bytes] = []
    async with aclosing(chat_completion_stream(run, "exo-tiny", include_usage=False)) as stream:
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 6:
                assert registry.cancel(run.completion_id)
    finishes = [json.loads(chunk[6:])["choices"][0]["finish_reason"] for chunk in chunks[:-1]]
    assert finishes.count("stop") == 2
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert not registry.cancel(run.completion_id)  # no longer in progress
    await wait_for_generations(services)
    assert all(call.closed_early for call in services.generate_calls)


async def test_closing_the_stream_cancels_the_generation() -> None:
    """A client that goes away: the SSE generator is closed, and every generation with it."""
    services = FakeNodeServices()
    services.script = [ord(character) for character in "a long answer"]
    registry = ActiveCompletions()
    run = await make_run(services, registry)
    stream = chat_completion_stream(run, "exo-tiny", include_usage=False)
    assert b'"role":"assistant"' in await anext(stream)
    assert b'"content":"a"' in await anext(stream)
    await stream.aclose()
    await wait_for_generations(services)
    (call,) = services.generate_calls
    assert call.closed_early
    assert len(registry) == 0


async def wait_for_generations(services: FakeNodeServices) -> None:
    async with asyncio.timeout(5):
        while not all(call.finished or call.closed_early for call in services.generate_calls):
            await services.generation_closed.wait()  # set as each generation closes
            services.generation_closed.clear()


def test_cancel_unknown_id_is_404(client: TestClient[Any]) -> None:
    assert_error(client.post("/v1/cancel/chatcmpl-nothing"), 404, "not_found", "completion_id")
    assert_error(client.post("/v1/cancel/bad%20id"), 400, "invalid_request", "completion_id")


def test_non_streamed_generation_is_closed_when_done(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    chat(client)
    wait_until_generation_ends(services.generate_calls[0])
    assert services.generate_calls[0].finished


def test_cached_prompt_tokens_are_reported(client: TestClient[Any], services: FakeNodeServices) -> None:
    assert "prompt_tokens_details" not in chat(client).json()["usage"]
    services.cached_tokens = 12
    usage = chat(client).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 12}
    chunks = stream_chunks(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 12}


async def test_an_opened_run_nobody_reads_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client gone between the first token and the start of its stream: the run is freed."""
    monkeypatch.setattr(runs, "OPEN_READ_TIMEOUT_S", 0.05)
    services = FakeNodeServices()
    services.script = [ord(character) for character in "a long answer " * 20]
    registry = ActiveCompletions()
    run = await make_run(services, registry)
    await run.open()
    assert len(registry) == 1
    await wait_for_generations(services)
    assert services.generate_calls[0].closed_early
    assert len(registry) == 0


@pytest.mark.parametrize(
    ("effort", "options"),
    [
        (None, {}),
        ("none", {"enable_thinking": False}),
        ("high", {"enable_thinking": True, "reasoning_effort": "high"}),
    ],
)
def test_reasoning_effort_becomes_template_variables(
    client: TestClient[Any], services: FakeNodeServices, effort: str | None, options: dict[str, Any]
) -> None:
    script_text(services, "hi")
    extra = {} if effort is None else {"reasoning_effort": effort}
    assert chat(client, **extra).status_code == 200
    assert services.tokenizers["exo-tiny"].template_options[-1] == options
