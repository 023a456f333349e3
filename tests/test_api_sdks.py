"""Real clients against a real node on loopback: the official `openai`, `anthropic` and `ollama`
Python packages, raw HTTP for the errors, a client that disconnects, a cancel by id.

One node for the module (`python -m exo.node`, with an API key so every client authenticates)
with a synthetic qwen2 model, whose chat template renders tools, and a llama one, whose template
does not. Synthetic weights are random: tool-call tests check shapes, not choices.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from openai.types.responses import ResponseCompletedEvent, ResponseIncompleteEvent

from tests.harness.cluster_harness import NodeProcess, free_port, wait_until
from tests.harness.inference_helpers import tiny_models

pytestmark = pytest.mark.slow

API_KEY = "sdk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QWEN = "tiny-qwen2"  # renders tools (Hermes <tool_call> form)
PLAIN = "tiny-llama"  # plain ChatML: its template does not render tools
HUGE = "huge-qwen2"  # headers claim 1.2 TB of weights: never fits
USER_HI: Any = [{"role": "user", "content": "Tell me about the sea."}]  # each SDK types it its own way
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def write_huge_model(folder: Path, template: Path) -> None:
    """A model folder whose safetensors header declares far more bytes than any machine has."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (template / name).exists():
            shutil.copy(template / name, folder / name)
    layers = json.loads((template / "config.json").read_text())["num_hidden_layers"]
    size = 200 * 10**9
    header = {
        f"model.layers.{index}.mlp.up_proj.weight": {
            "dtype": "F32",
            "shape": [size // 4],
            "data_offsets": [index * size, (index + 1) * size],
        }
        for index in range(layers)
    }
    encoded = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("api-sdks")
    models = root / "models"
    models.mkdir()
    shutil.copytree(tiny_models()["qwen2"], models / QWEN)
    shutil.copytree(tiny_models()["llama"], models / PLAIN)
    write_huge_model(models / HUGE, models / QWEN)
    process = NodeProcess(
        name="node0",
        data_dir=root / "node0",
        bus_port=free_port(),
        api_port=free_port(),
        peers=[],
        extra_args=["--models-dir", str(models), "--api-key", API_KEY],
    )
    process.start()
    try:
        wait_until(lambda: get(process, "/state")["master_node_id"], 60, "a master")
        # Load the qwen2 model once, up front: each test then only generates.
        response = httpx.post(
            process.url + "/place_instance", json={"model_id": QWEN}, headers=AUTH, timeout=30
        )
        assert response.status_code == 200, response.text
        wait_until(
            lambda: any(i["status"] == "ready" for i in get(process, "/state")["instances"].values()),
            120,
            "the qwen2 instance ready",
        )
        yield process
    finally:
        process.kill()
        if process.log_path is not None:
            print(process.log_tail(60))


def get(node: NodeProcess, path: str) -> Any:
    response = httpx.get(node.url + path, headers=AUTH, timeout=10)
    response.raise_for_status()
    return response.json()


def chat(node: NodeProcess, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(node.url + "/v1/chat/completions", json=body, headers=headers or AUTH, timeout=120)


def sse_payloads(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == ""
    payloads = [block.removeprefix("data: ") for block in blocks[:-1]]
    return [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


@pytest.fixture(scope="module")
def openai_client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


# --- OpenAI ----------------------------------------------------------------------------------


def test_stream_equals_non_streamed_at_temperature_zero(node: NodeProcess) -> None:
    body = {"model": QWEN, "messages": USER_HI, "max_tokens": 24, "temperature": 0}
    whole = chat(node, body).json()
    payloads = sse_payloads(chat(node, {**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert payloads[-1] == "[DONE]"
    chunks, usage_chunk = payloads[:-2], payloads[-2]
    assert len({(chunk["id"], chunk["created"], chunk["model"]) for chunk in [*chunks, usage_chunk]}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finish_reasons = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert finish_reasons[:-1] == [None] * (len(chunks) - 1)
    assert finish_reasons[-1] == whole["choices"][0]["finish_reason"]
    streamed = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert usage_chunk["choices"] == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens may differ: a cache hit
    assert [usage_chunk["usage"][key] for key in counts] == [whole["usage"][key] for key in counts]
    usage = whole["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]
    assert usage["completion_tokens"] <= 24
    no_usage = sse_payloads(chat(node, {**body, "stream": True}))
    assert not any("usage" in payload for payload in no_usage[:-1])


def test_openai_sdk_chat_stream_n_and_seed(openai_client: openai.OpenAI) -> None:
    completion = openai_client.chat.completions.create(
        model=QWEN, messages=USER_HI, max_tokens=12, n=2, seed=5, temperature=1.0, user="tester"
    )
    assert [choice.index for choice in completion.choices] == [0, 1]
    again = openai_client.chat.completions.create(model=QWEN, messages=USER_HI, max_tokens=12, n=2, seed=5)
    assert [choice.message.content for choice in again.choices] == [
        choice.message.content for choice in completion.choices
    ]  # same seed, same text
    texts: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, str | None] = {}
    stream = openai_client.chat.completions.create(
        model=QWEN, messages=USER_HI, max_tokens=12, n=2, seed=5, stream=True
    )
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert [texts[0], texts[1]] == [choice.message.content for choice in completion.choices]
    assert set(finished) == {0, 1}


def test_openai_sdk_logprobs(openai_client: openai.OpenAI) -> None:
    completion = openai_client.chat.completions.create(
        model=QWEN, messages=USER_HI, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert "".join(entry.token for entry in entries) == choice.message.content
    assert completion.usage is not None and len(entries) == completion.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes is not None
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the top


def test_openai_sdk_tools_shape(openai_client: openai.OpenAI) -> None:
    plain = openai_client.chat.completions.create(model=QWEN, messages=USER_HI, max_tokens=4, temperature=0)
    for tool_choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        completion = openai_client.chat.completions.create(
            model=QWEN,
            messages=USER_HI,
            max_tokens=16,
            temperature=0,
            tools=[WEATHER_TOOL],
            tool_choice=tool_choice,  # type: ignore[arg-type]
        )
        assert completion.usage is not None and plain.usage is not None
        assert completion.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the tools were rendered
        choice = completion.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        for call in choice.message.tool_calls or []:
            assert call.type == "function" and call.id
            assert isinstance(json.loads(call.function.arguments), dict)  # type: ignore[union-attr]
    stream = openai_client.chat.completions.create(
        model=QWEN, messages=USER_HI, max_tokens=16, tools=[WEATHER_TOOL], stream=True
    )
    reasons = [choice.finish_reason for chunk in stream for choice in chunk.choices if choice.finish_reason]
    assert len(reasons) == 1


def test_tools_on_a_model_that_cannot_call_them(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model=PLAIN, messages=USER_HI, tools=[WEATHER_TOOL])
    assert "does not render tools" in str(raised.value)


def test_openai_sdk_text_completions_and_models(openai_client: openai.OpenAI) -> None:
    completion = openai_client.completions.create(
        model=QWEN, prompt="The sea is", max_tokens=6, temperature=0
    )
    streamed = "".join(
        choice.text
        for chunk in openai_client.completions.create(
            model=QWEN, prompt="The sea is", max_tokens=6, temperature=0, stream=True
        )
        for choice in chunk.choices
    )
    assert streamed == completion.choices[0].text and completion.usage is not None
    assert completion.usage.completion_tokens == 6
    model = openai_client.models.retrieve(QWEN)
    assert model.id == QWEN
    assert QWEN in {listed.id for listed in openai_client.models.list()}
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("no-such-model")


def test_openai_sdk_wrong_key(node: NodeProcess) -> None:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=QWEN, messages=USER_HI, max_tokens=2)


# --- raw HTTP errors -------------------------------------------------------------------------


def assert_error(response: httpx.Response, status_code: int, code: str, param: str | None = None) -> str:
    assert response.status_code == status_code, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["type"] == ("invalid_request_error" if status_code < 500 else "server_error")
    if param is not None:
        assert body["error"]["param"] == param
    return str(body["error"]["message"])


def test_errors_on_a_real_node(node: NodeProcess) -> None:
    post = node.url + "/v1/chat/completions"
    malformed = httpx.post(post, content=b'{"model": ', headers={**AUTH, "content-type": "application/json"})
    assert "malformed JSON" in assert_error(malformed, 400, "invalid_request")
    assert_error(chat(node, {"model": QWEN}), 400, "invalid_request", "messages")
    assert_error(chat(node, {"model": QWEN, "messages": []}), 400, "invalid_request", "messages")
    assert_error(
        chat(node, {"model": QWEN, "messages": USER_HI, "max_tokens": "9"}),
        400,
        "invalid_request",
        "max_tokens",
    )
    stream_options = {"model": QWEN, "messages": USER_HI, "stream_options": {"include_usage": True}}
    assert_error(chat(node, stream_options), 400, "invalid_request", "stream_options")
    unsupported = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {"if": {}}}}
    json_mode = {"model": QWEN, "messages": USER_HI, "response_format": unsupported}
    assert_error(chat(node, json_mode), 400, "unsupported_schema", "response_format.json_schema.schema")
    tool_choice = {"model": QWEN, "messages": USER_HI, "tool_choice": "required"}
    assert_error(chat(node, tool_choice), 400, "invalid_request", "tool_choice")
    assert "nope" in assert_error(
        chat(node, {"model": "nope", "messages": USER_HI}), 404, "model_not_found", "model"
    )
    huge = assert_error(chat(node, {"model": HUGE, "messages": USER_HI}), 503, "no_capacity")
    assert "not enough capacity" in huge and "short by" in huge
    long_prompt = [{"role": "user", "content": "sea " * 5000}]
    message = assert_error(
        chat(node, {"model": QWEN, "messages": long_prompt}), 400, "context_length_exceeded"
    )
    assert "maximum context length is 4096 tokens" in message
    too_many = {"model": QWEN, "messages": USER_HI, "max_tokens": 5000}
    assert_error(chat(node, too_many), 400, "context_length_exceeded", "max_tokens")
    assert_error(
        chat(node, {"model": QWEN, "messages": USER_HI}, {"Authorization": "Bearer x"}),
        401,
        "invalid_api_key",
    )


# --- disconnect and cancel -------------------------------------------------------------------


def runner_stats(node: NodeProcess) -> dict[str, Any]:
    """The qwen2 runner's latest RunnerStats (sent every 2 s)."""
    state = get(node, "/state")
    instance_id = next(i for i, instance in state["instances"].items() if instance["model_id"] == QWEN)
    return dict(get(node, "/node_status")["runners"][instance_id]["stats"] or {})


def endless_body() -> dict[str, Any]:
    """A generation that would run for thousands of tokens: end-of-sequence banned."""
    end_ids = json.loads((tiny_models()["qwen2"] / "config.json").read_text())["eos_token_id"]
    return {
        "model": QWEN,
        "messages": USER_HI,
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
        "logprobs": True,  # one entry per token: count what arrived
        "logit_bias": {str(token): -100 for token in end_ids},
    }


def test_a_client_that_disconnects_stops_generation(node: NodeProcess) -> None:
    before = wait_until(
        lambda: (s := runner_stats(node)) and s["active_requests"] == 0 and s, 10, "idle runner"
    )
    received = 0
    with httpx.stream(
        "POST", node.url + "/v1/chat/completions", json=endless_body(), headers=AUTH, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and (logprobs := json.loads(line[6:])["choices"][0]["logprobs"]):
                received += len(logprobs["content"])
            if received >= 40:
                break  # leaving the block closes the connection mid-stream
    stopped = wait_until(
        lambda: (
            (s := runner_stats(node))["active_requests"] == 0
            and s["tokens_sampled"] > before["tokens_sampled"]
            and s
        ),
        15,
        "the runner to drop the request",
    )
    sampled = stopped["tokens_sampled"] - before["tokens_sampled"]
    print(f"disconnect: {received} tokens received, {sampled} sampled")
    assert sampled < received + 30, (sampled, received)  # stopped within a few steps, not at 3000
    assert_stays_idle(node, stopped["steps_done"])


def test_a_client_that_gives_up_on_a_non_streamed_answer_stops_generation(node: NodeProcess) -> None:
    before = wait_until(
        lambda: (s := runner_stats(node)) and s["active_requests"] == 0 and s, 10, "idle runner"
    )
    body = {**endless_body(), "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(node.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=1.5)
    stopped = wait_until(
        lambda: (s := runner_stats(node))["active_requests"] == 0 and s, 15, "the runner to drop the request"
    )
    assert stopped["tokens_sampled"] - before["tokens_sampled"] < 1500  # of the 3000 asked for
    assert_stays_idle(node, stopped["steps_done"])


def assert_stays_idle(node: NodeProcess, steps_done: int, seconds: float = 4.5) -> None:
    """Nothing more is computed: steps_done does not move over two more stats reports."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert runner_stats(node)["steps_done"] == steps_done
        time.sleep(0.5)


def test_cancel_by_id(node: NodeProcess) -> None:
    with httpx.stream(
        "POST", node.url + "/v1/chat/completions", json=endless_body(), headers=AUTH, timeout=60
    ) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        cancelled = httpx.post(node.url + f"/v1/cancel/{first['id']}", headers=AUTH, timeout=10)
        assert cancelled.status_code == 200 and cancelled.json() == {"id": first["id"], "cancelled": True}
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "stop"
    wait_until(lambda: runner_stats(node)["active_requests"] == 0, 10, "the runner to drop the request")
    assert_error(httpx.post(node.url + f"/v1/cancel/{first['id']}", headers=AUTH), 404, "not_found")


# --- Claude ----------------------------------------------------------------------------------


def test_anthropic_sdk(node: NodeProcess) -> None:
    client = anthropic.Anthropic(base_url=node.url, api_key=API_KEY, max_retries=0)
    message = client.messages.create(
        model=QWEN, max_tokens=8, system="Be brief.", messages=USER_HI, extra_body={"temperature": 0}
    )
    assert message.role == "assistant" and message.stop_reason in ("max_tokens", "end_turn")
    assert 0 < message.usage.output_tokens <= 8 and message.content[0].type == "text"
    with client.messages.stream(
        model=QWEN, max_tokens=8, system="Be brief.", messages=USER_HI, extra_body={"temperature": 0}
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == message.content[0].text  # type: ignore[union-attr]
    assert (final.stop_reason, final.usage.output_tokens) == (
        message.stop_reason,
        message.usage.output_tokens,
    )
    tool = {
        "name": "get_weather",
        "description": "Weather",
        "input_schema": WEATHER_TOOL["function"]["parameters"],
    }
    with_tools = client.messages.create(model=QWEN, max_tokens=16, messages=USER_HI, tools=[tool])  # type: ignore[list-item]
    assert with_tools.usage.input_tokens > message.usage.input_tokens
    assert with_tools.stop_reason in ("end_turn", "max_tokens", "tool_use")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=8, messages=USER_HI)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=node.url, api_key="wrong", max_retries=0).messages.create(
            model=QWEN, max_tokens=8, messages=USER_HI
        )


# --- Ollama ----------------------------------------------------------------------------------


def test_ollama_client(node: NodeProcess) -> None:
    client = ollama.Client(host=node.url + "/ollama", headers=AUTH)
    options = {"temperature": 0, "num_predict": 8}
    answer = client.chat(model=QWEN, messages=USER_HI, options=options)
    assert answer.done and answer.done_reason in ("length", "stop") and 0 < (answer.eval_count or 0) <= 8
    streamed = "".join(
        part.message.content or ""
        for part in client.chat(model=QWEN, messages=USER_HI, options=options, stream=True)
    )
    assert streamed == answer.message.content
    generated = client.generate(model=QWEN + ":latest", prompt="The sea", options=options)
    assert generated.done and generated.response
    assert QWEN + ":latest" in {model.model for model in client.list().models}
    assert QWEN + ":latest" in {model.model for model in client.ps().models}
    shown = client.show(QWEN)
    assert shown.capabilities is not None and "tools" in shown.capabilities
    tools_answer = client.chat(model=QWEN, messages=USER_HI, tools=[WEATHER_TOOL], options=options)
    assert tools_answer.done
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(model="nope", messages=USER_HI)
    assert raised.value.status_code == 404 and "nope" in raised.value.error
    with pytest.raises(ollama.ResponseError) as raised:
        ollama.Client(host=node.url + "/ollama").list()
    assert raised.value.status_code == 401


# --- OpenAI Responses ------------------------------------------------------------------------


def test_openai_sdk_responses_create_stream_and_chain(openai_client: openai.OpenAI) -> None:
    whole = openai_client.responses.create(
        model=QWEN,
        input="Tell me about the sea.",
        instructions="Be brief.",
        max_output_tokens=12,
        temperature=0,
    )
    assert whole.id.startswith("resp_") and whole.status in ("completed", "incomplete")
    assert whole.usage is not None and 0 < whole.usage.output_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    if whole.status == "incomplete":  # random weights rarely end by themselves
        assert whole.incomplete_details is not None and whole.incomplete_details.reason == "max_output_tokens"
    events = list(
        openai_client.responses.create(
            model=QWEN,
            input="Tell me about the sea.",
            instructions="Be brief.",
            max_output_tokens=12,
            temperature=0,
            stream=True,
        )
    )
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == f"response.{whole.status}"
    streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert streamed == whole.output_text  # temperature 0: the same answer
    with openai_client.responses.stream(
        model=QWEN,
        input="Tell me about the sea.",
        instructions="Be brief.",
        max_output_tokens=12,
        temperature=0,
    ) as stream:
        last = [event for event in stream][-1]
    assert isinstance(last, ResponseCompletedEvent | ResponseIncompleteEvent) and last.type == events[-1].type
    assert last.response.output_text == whole.output_text
    chained = openai_client.responses.create(
        model=QWEN, input="And the sky?", previous_response_id=whole.id, max_output_tokens=4
    )
    assert chained.usage is not None and whole.usage is not None
    assert chained.usage.input_tokens > whole.usage.input_tokens  # the earlier turn is in the prompt
    assert openai_client.responses.retrieve(chained.id).previous_response_id == whole.id
    assert [item.type for item in openai_client.responses.input_items.list(chained.id).data] == ["message"]
    openai_client.responses.delete(whole.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.create(model=QWEN, input="x", previous_response_id=whole.id)


def test_openai_sdk_responses_function_call_output_round_trip(openai_client: openai.OpenAI) -> None:
    """A client's own function call and its output, sent as items; then chained on."""
    tool: Any = {"type": "function", **WEATHER_TOOL["function"]}
    first = openai_client.responses.create(
        model=QWEN,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "clear"}'},
        ],
        tools=[tool],
        max_output_tokens=8,
        temperature=0,
    )
    assert first.status in ("completed", "incomplete") and first.tools[0].type == "function"
    for call in (item for item in first.output if item.type == "function_call"):
        assert call.name == "get_weather"  # whatever random weights call, it is a declared tool
    second = openai_client.responses.create(
        model=QWEN, input="Thanks!", previous_response_id=first.id, tools=[tool], max_output_tokens=4
    )
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.responses.create(
            model=QWEN, input=[{"type": "function_call_output", "call_id": "nope", "output": "x"}]
        )
    assert refused.value.param == "input[0].call_id"


@pytest.fixture(scope="module")
def eos_model(node: NodeProcess, openai_client: openai.OpenAI) -> str:
    """A copy of the qwen2 model whose end-of-sequence token is the third token of its greedy answer,
    so that answer ends by itself (status completed) on random weights."""
    from tokenizers import Tokenizer  # pyright: ignore[reportMissingTypeStubs]

    source = tiny_models()["qwen2"]
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    greedy = openai_client.chat.completions.create(
        model=QWEN, messages=USER_HI, max_tokens=8, temperature=0, logprobs=True
    )
    assert greedy.choices[0].logprobs is not None and greedy.choices[0].logprobs.content is not None
    seen: list[int] = []
    for entry in greedy.choices[0].logprobs.content:
        ids = tokenizer.encode(entry.token, add_special_tokens=False).ids
        if len(seen) >= 2 and len(ids) == 1 and ids[0] not in seen:
            end_token = tokenizer.id_to_token(ids[0])
            break
        seen += ids
    else:
        pytest.fail("no token of the greedy answer can serve as the end of sequence")
    models_dir = Path(node.extra_args[node.extra_args.index("--models-dir") + 1])
    folder = models_dir / "tiny-qwen2-eos"
    shutil.copytree(source, folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token"] = end_token
        (folder / name).write_text(json.dumps(config))
    wait_until(
        lambda: any(model["id"] == folder.name for model in get(node, "/v1/models")["data"]), 30, "the copy"
    )
    return folder.name


def test_openai_sdk_responses_stream_helper_final_response(
    openai_client: openai.OpenAI, eos_model: str
) -> None:
    whole = openai_client.responses.create(model=eos_model, input=USER_HI[0]["content"], temperature=0)
    assert whole.status == "completed" and whole.output_text
    with openai_client.responses.stream(
        model=eos_model, input=USER_HI[0]["content"], temperature=0
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas) == whole.output_text
    assert openai_client.responses.retrieve(final.id).output_text == final.output_text


def test_anthropic_sdk_count_tokens(node: NodeProcess) -> None:
    client = anthropic.Anthropic(base_url=node.url, api_key=API_KEY, max_retries=0)
    tool: Any = {
        "name": "get_weather",
        "description": "Weather",
        "input_schema": WEATHER_TOOL["function"]["parameters"],
    }
    for extra in ({}, {"system": "Be brief.", "tools": [tool]}):
        counted = client.messages.count_tokens(model=QWEN, messages=USER_HI, **extra)
        answered = client.messages.create(model=QWEN, max_tokens=1, messages=USER_HI, **extra)
        assert counted.input_tokens == answered.usage.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=USER_HI)


def test_embeddings_are_not_supported(openai_client: openai.OpenAI, node: NodeProcess) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        openai_client.embeddings.create(model=QWEN, input="hi")
    assert refused.value.status_code == 501 and refused.value.code == "not_supported"
    with pytest.raises(ollama.ResponseError) as ollama_refused:
        ollama.Client(host=node.url + "/ollama", headers=AUTH).embed(model=QWEN, input="hi")
    assert ollama_refused.value.status_code == 501 and "not supported" in ollama_refused.value.error
