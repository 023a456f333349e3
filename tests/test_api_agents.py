"""What agent frameworks call, with the real SDKs, against the built-in exo-tiny split over two
node processes (a two-stage pipeline): structured output (`.parse()` with a Pydantic model,
Ollama `format`), tools with every `tool_choice` (OpenAI and Claude), the errors; and reasoning on
a synthetic model whose template opens Qwen 3's `<think>` block.

The weights are random and sampled at temperature 1, so the model picks whatever the grammar
allows: every structured answer must still parse and match its schema, and every forced call must
name a declared tool with arguments that match its parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import anthropic
import httpx
import jsonschema_rs
import msgspec
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

from exo.inference.synthetic import BUILTIN_SPEC, write_synthetic_model
from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, wait_until

pytestmark = pytest.mark.slow

MODEL = "exo-tiny"
THINKER = "tiny-thinker"  # its template opens <think> for the model: random weights think all along
USER: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ZONE = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
WEATHER: Any = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
TIME: Any = {"type": "function", "function": {"name": "get_time", "parameters": ZONE}}
SCHEMAS = {"get_weather": CITY, "get_time": ZONE}


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    pet: Literal["cat", "dog", "fish"]
    friendly: bool


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("agents")
    write_synthetic_model(
        root / "models" / THINKER, msgspec.structs.replace(BUILTIN_SPEC, template="thinking")
    )
    with LoopbackCluster(root, 2, ["--models-dir", str(root / "models")]) as cluster:
        cluster.start_all()
        first = cluster.nodes[0]
        wait_until(
            lambda: (s := cluster.converged()) and len(s["nodes"]) == 2 and s["master_node_id"],
            90,
            "two nodes agree",
        )
        response = first.post("/place_instance", {"model_id": MODEL, "sharding": "Pipeline", "min_nodes": 2})
        assert response.status_code == 200, response.text
        instance_id = response.json()["instance_id"]
        instance = wait_until(
            lambda: (i := first.get(f"/instance/{instance_id}"))["status"] == "ready" and i, 120, "2 stages"
        )
        assert len(instance["shard_assignments"]) == 2
        yield first


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def assert_calls_valid(calls: list[tuple[str, Any]], names: set[str]) -> None:
    assert calls
    for name, arguments in calls:
        assert name in names
        jsonschema_rs.validator_for(SCHEMAS[name]).validate(arguments)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=USER, response_format=Person, temperature=1.0, seed=7, n=3, max_tokens=200
    )
    assert len(completion.choices) == 3
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)
    assert len({choice.message.content for choice in completion.choices}) > 1


def test_json_object_and_a_cut_answer_says_length(client: openai.OpenAI) -> None:
    cut = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=3,
        max_tokens=3,
    )
    assert cut.choices[0].finish_reason == "length"
    assert (cut.choices[0].message.content or "").startswith("{")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls(client: openai.OpenAI, tool_choice: Any) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        temperature=1.0,
        seed=11,
        n=2,
        max_tokens=300,
    )
    names = {"get_time"} if isinstance(tool_choice, dict) else {"get_weather", "get_time"}
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls"
        calls = choice.message.tool_calls or []
        assert_calls_valid([(c.function.name, json.loads(c.function.arguments)) for c in calls], names)  # type: ignore[union-attr]
        if isinstance(tool_choice, dict):
            assert len(calls) == 1


def test_required_with_parallel_false_streams_exactly_one_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        seed=5,
        max_tokens=300,
        stream=True,
    )
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    reasons: list[str] = []
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.function is not None and delta.function.name:
                    names[delta.index] = delta.function.name
                if delta.function is not None and delta.function.arguments:
                    arguments[delta.index] = arguments.get(delta.index, "") + delta.function.arguments
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"] and list(names) == [0]
    assert_calls_valid([(names[0], json.loads(arguments[0]))], set(SCHEMAS))


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_auto_and_none(client: openai.OpenAI, tool_choice: Literal["auto", "none"]) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=[WEATHER],
        tool_choice=tool_choice,
        temperature=1.0,
        seed=2,
        max_tokens=40,
    )
    message = completion.choices[0].message
    if tool_choice == "none":
        assert not message.tool_calls
    calls = message.tool_calls or []
    for call in calls:  # a call the model chose to make still matches the schema
        assert_calls_valid([(call.function.name, json.loads(call.function.arguments))], {"get_weather"})  # type: ignore[union-attr]


def test_anthropic_tool_choice_any(node: NodeProcess) -> None:
    claude = anthropic.Anthropic(base_url=node.url, api_key="unused", max_retries=0, timeout=300)
    tools: Any = [
        {"name": "get_weather", "input_schema": CITY},
        {"name": "get_time", "description": "Time in a zone", "input_schema": ZONE},
    ]
    message = claude.messages.create(
        model=MODEL, max_tokens=300, messages=USER, tools=tools, tool_choice={"type": "any"}
    )
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert_calls_valid([(block.name, block.input) for block in uses], set(SCHEMAS))


def test_ollama_format_schema(node: NodeProcess) -> None:
    client = ollama.Client(host=node.url + "/ollama", timeout=300)
    schema = Person.model_json_schema()
    response = client.chat(
        model=MODEL, messages=USER, format=schema, options={"temperature": 1.0, "seed": 4, "num_predict": 200}
    )
    assert response.done_reason == "stop"
    Person.model_validate_json(response.message.content or "")
    generated = client.generate(model=MODEL, prompt="A person:", format="json", options={"num_predict": 2})
    assert (generated.response or "").startswith("{")


def test_bad_inputs_are_400(client: openai.OpenAI, node: NodeProcess) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "strict": True, "schema": {"type": "object", "if": {}}},
            },
        )
    assert "Unimplemented keys" in str(raised.value) and "if" in str(raised.value)
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    response = httpx.post(
        node.url + "/ollama/api/chat",
        json={
            "model": MODEL,
            "messages": USER,
            "format": {"type": "object", "properties": {"a": {"type": 3}}},
        },
        timeout=30,
    )
    assert response.status_code == 400 and "type must be a string" in response.text


def test_reasoning_is_separated_in_every_dialect(client: openai.OpenAI, node: NodeProcess) -> None:
    thought = client.chat.completions.create(model=THINKER, messages=USER, temperature=0, max_tokens=12)
    message = thought.choices[0].message
    assert getattr(message, "reasoning_content", None) and not message.content
    plain = client.chat.completions.create(
        model=THINKER, messages=USER, temperature=0, max_tokens=12, reasoning_effort="none"
    )
    assert (
        plain.choices[0].message.content
        and getattr(plain.choices[0].message, "reasoning_content", None) is None
    )
    stream = client.chat.completions.create(
        model=THINKER, messages=USER, temperature=0, max_tokens=12, stream=True
    )
    streamed = "".join(
        getattr(choice.delta, "reasoning_content", None) or "" for chunk in stream for choice in chunk.choices
    )
    assert streamed == getattr(message, "reasoning_content", None)
    claude = anthropic.Anthropic(base_url=node.url, api_key="unused", max_retries=0, timeout=300)
    answer = claude.messages.create(model=THINKER, max_tokens=12, messages=USER)
    assert answer.content[0].type == "thinking" and answer.content[0].thinking
    with claude.messages.stream(model=THINKER, max_tokens=12, messages=USER) as claude_stream:
        final = claude_stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking
    ollama_client = ollama.Client(host=node.url + "/ollama", timeout=300)
    thinking = ollama_client.chat(model=THINKER, messages=USER, think=True, options={"num_predict": 12})
    assert thinking.message.thinking and not thinking.message.content
    unthinking = ollama_client.chat(model=THINKER, messages=USER, think=False, options={"num_predict": 12})
    assert unthinking.message.content and not unthinking.message.thinking
    parsed = client.chat.completions.parse(
        model=THINKER, messages=USER, response_format=Person, reasoning_effort="none", max_tokens=200, seed=1
    )
    assert isinstance(parsed.choices[0].message.parsed, Person)  # thinking off: the answer is the JSON
    assert "thinking" in (ollama_client.show(THINKER).capabilities or [])
    assert "thinking" not in (ollama_client.show(MODEL).capabilities or [])
