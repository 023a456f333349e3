"""Thinking and tool calls split out of the answer with mlx-lm's markers and parsers, on the real
mlx-lm tokenizer of a synthetic model whose template thinks (Qwen 3's `<think>` block) and calls
tools (Hermes `<tool_call>`): token by token, with log-probabilities lined up with the content."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from exo.api.channels import OutputSplitter, mlx_lm_parse, model_markers, opens_thinking
from exo.api.cluster_port import GeneratedToken
from exo.api.decoding import ChoiceDecoder, ChoiceEnded, ChoiceEvent, ReasoningDelta, TextDelta, ToolCallMade
from exo.inference.synthetic import BUILTIN_SPEC, write_synthetic_model

WEATHER: Any = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    folder = Path(tempfile.mkdtemp(prefix="exo-thinking-")) / "thinker"
    spec = msgspec.structs.replace(BUILTIN_SPEC, layers=1, template="thinking")
    return load_tokenizer(write_synthetic_model(folder, spec))


def decode(tokenizer: Any, text: str, *, tools: bool, initial: str = "normal") -> list[ChoiceEvent]:
    markers = model_markers(tokenizer, tools=tools)
    assert markers is not None
    parse = mlx_lm_parse(tokenizer, [WEATHER]) if tools else None
    decoder = ChoiceDecoder(
        tokenizer, max_tokens=1000, stop_strings=[], extractor=OutputSplitter(markers, parse, initial)
    )
    events: list[ChoiceEvent] = []
    for token in tokenizer.encode(text, add_special_tokens=False):  # one token at a time, as streamed
        events += decoder.feed(GeneratedToken(token, logprob=-0.5, top_logprobs=[]))
    return events + decoder.feed(GeneratedToken(min(tokenizer.eos_token_ids), "stop"))


def parts(events: list[ChoiceEvent]) -> tuple[str, str, list[ToolCallMade], str]:
    reasoning = "".join(event.text for event in events if isinstance(event, ReasoningDelta))
    content = "".join(event.text for event in events if isinstance(event, TextDelta))
    calls = [event for event in events if isinstance(event, ToolCallMade)]
    logprob_text = "".join(
        entry.token for event in events if isinstance(event, TextDelta) for entry in event.logprobs
    )
    assert logprob_text == content  # the logprob tokens join to exactly the content
    return reasoning, content, calls, logprob_text


def test_the_tokenizer_has_the_markers_mlx_lm_looks_for(tokenizer: Any) -> None:
    assert tokenizer.has_thinking and tokenizer.think_start == "<think>"
    assert tokenizer.tool_call_start == "<tool_call>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert opens_thinking(tokenizer, prompt)  # the template opened the block for the model
    closed = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, enable_thinking=False
    )
    assert not opens_thinking(tokenizer, closed)


def test_thinking_then_content_then_a_call(tokenizer: Any) -> None:
    text = (
        "<think>\nThe user wants weather.\n</think>\n\nLet me check."
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    events = decode(tokenizer, text, tools=True)
    reasoning, content, calls, _ = parts(events)
    assert reasoning == "\nThe user wants weather.\n"
    assert content == "\n\nLet me check."
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", {"city": "Oslo"})]
    assert isinstance(events[-1], ChoiceEnded) and events[-1].reason == "tool_calls"


def test_an_answer_that_starts_inside_the_block_the_prompt_opened(tokenizer: Any) -> None:
    reasoning, content, calls, _ = parts(
        decode(tokenizer, "hmm, rain</think>It rains.", tools=False, initial="reasoning")
    )
    assert (reasoning, content, calls) == ("hmm, rain", "It rains.", [])


def test_a_call_that_does_not_parse_stays_text(tokenizer: Any) -> None:
    text = "<tool_call>not json</tool_call> done"
    reasoning, content, calls, _ = parts(decode(tokenizer, text, tools=True))
    assert (reasoning, calls) == ("", [])
    assert content == text


def test_without_tools_a_call_marker_is_content(tokenizer: Any) -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    _, content, calls, _ = parts(decode(tokenizer, text, tools=False))
    assert content == text and calls == []
