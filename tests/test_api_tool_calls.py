"""Tool calls in generated text (canned model outputs), and the choice decoder around them."""

from __future__ import annotations

import json

import pytest

from exo.api.cluster_port import GeneratedToken
from exo.api.decoding import ChoiceDecoder, ChoiceEnded, ChoiceEvent, TextDelta, ToolCallMade
from exo.api.tool_calls import (
    CallPiece,
    ContentPiece,
    ParsedCall,
    Piece,
    ToolCallExtractor,
    parse_json_calls,
    parse_tool_calls,
)
from tests.harness.fakes import END_OF_SEQUENCE, FakeTokenizer

WEATHER = ParsedCall("get_weather", '{"city": "Paris"}')

# What real models write when they call tools (Qwen 2.5 / Hermes, llama 3.x).
CANNED: list[tuple[str, str, list[ParsedCall]]] = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "", [WEATHER]),
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "Let me check.\n",
        [WEATHER],
    ),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "\n",
        [WEATHER, ParsedCall("get_time", "{}")],
    ),
    # Arguments given as JSON text inside the JSON, as some fine-tunes write them.
    (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>',
        "",
        [WEATHER],
    ),
    # llama 3: the whole answer is the call, with "parameters".
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    ('  {"name": "get_weather", "parameters": {"city": "Paris"}}\n', "", [WEATHER]),
    (
        '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]',
        "",
        [WEATHER, ParsedCall("get_time", "{}")],
    ),
    (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
        "",
        [WEATHER, ParsedCall("get_time", "{}")],
    ),
    # An unclosed Hermes call at the end of the answer still counts.
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [WEATHER]),
    # Not calls: plain text, JSON that is not a call, a broken call, a tag that is not the tag.
    ("The weather is fine.", "The weather is fine.", []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),
    ("<tool_call>{not json}</tool_call> ok", "<tool_call>{not json}</tool_call> ok", []),
    ("a <tool_cal> b", "a <tool_cal> b", []),
    ("<b>bold</b>", "<b>bold</b>", []),
]


@pytest.mark.parametrize(("output", "content", "calls"), CANNED)
def test_canned_outputs(output: str, content: str, calls: list[ParsedCall]) -> None:
    assert parse_tool_calls(output) == (content, calls)


@pytest.mark.parametrize(("output", "content", "calls"), CANNED)
def test_any_split_into_pieces_gives_the_same(output: str, content: str, calls: list[ParsedCall]) -> None:
    for size in (1, 2, 3, 7):
        extractor = ToolCallExtractor()
        pieces: list[Piece] = []
        for start in range(0, len(output), size):
            pieces += extractor.feed(output[start : start + size])
        pieces += extractor.finish()
        assert "".join(piece.text for piece in pieces if isinstance(piece, ContentPiece)) == content
        assert [piece.call for piece in pieces if isinstance(piece, CallPiece)] == calls


def test_content_before_a_call_streams_before_the_call_is_complete() -> None:
    extractor = ToolCallExtractor()
    assert extractor.feed("Sure, <tool") == [ContentPiece("Sure, ", 0, 6)]  # the tag is held
    assert extractor.feed('_call>{"name": "f", "arguments": {}') == []
    assert extractor.feed("}</tool_call>") == [CallPiece(ParsedCall("f", "{}"), 6, 59)]


def test_forced_prefix_is_parsed_but_not_fed() -> None:
    extractor = ToolCallExtractor('<tool_call>\n{"name": "get_weather", "arguments": ')
    pieces = extractor.feed('{"city": "Paris"}}\n</tool_call>') + extractor.finish()
    assert pieces == [CallPiece(WEATHER, 0, 31)]


def test_parse_json_calls_refuses_non_calls() -> None:
    assert parse_json_calls("") is None
    assert parse_json_calls('{"name": 3}') is None
    assert parse_json_calls('{"name": "f", "parameters": [1]}') is None
    assert parse_json_calls('[{"name": "f"}, {"x": 1}]') is None


# --- the decoder: tokens -> events ------------------------------------------------------------


def decode(
    text_tokens: list[str], *, stop: list[str] | None = None, tools: bool = False, max_tokens: int = 100
) -> list[ChoiceEvent]:
    """Feed tokens (each a piece of text, with logprob -0.5), then end of sequence."""
    vocabulary = {1000 + index: piece for index, piece in enumerate(text_tokens)}
    decoder = ChoiceDecoder(
        FakeTokenizer(vocabulary),
        max_tokens=max_tokens,
        stop_strings=stop or [],
        extractor=ToolCallExtractor() if tools else None,
    )
    events: list[ChoiceEvent] = []
    for token in vocabulary:
        events += decoder.feed(GeneratedToken(token, logprob=-0.5, top_logprobs=[(token, -0.5)]))
        if decoder.ended is not None:
            return events
    return events + decoder.feed(GeneratedToken(END_OF_SEQUENCE, "stop"))


def content(events: list[ChoiceEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


def logprob_tokens(events: list[ChoiceEvent]) -> list[str]:
    return [entry.token for event in events if isinstance(event, TextDelta) for entry in event.logprobs]


def test_decoder_logprobs_join_to_the_content() -> None:
    events = decode(["Hel", "lo", " wor", "ld"])
    assert content(events) == "Hello world"
    assert logprob_tokens(events) == ["Hel", "lo", " wor", "ld"]
    assert events[-1] == ChoiceEnded("stop", None, end_of_sequence=True)


@pytest.mark.parametrize(
    ("stop", "text", "tokens"),
    [
        (["lo w"], "Hel", ["Hel"]),  # the match starts inside "lo": that token is cut to nothing
        (["o wo"], "Hell", ["Hel", "l"]),  # a token cut in the middle keeps its first part
        (["Hel"], "", []),
    ],
)
def test_decoder_logprobs_follow_the_stop_string_cut(stop: list[str], text: str, tokens: list[str]) -> None:
    events = decode(["Hel", "lo", " wor", "ld"], stop=stop)
    assert content(events) == text
    assert "".join(logprob_tokens(events)) == text
    assert logprob_tokens(events) == tokens
    assert events[-1] == ChoiceEnded("stop", stop[0])


def test_decoder_tool_call_is_not_content_and_finishes_with_tool_calls() -> None:
    pieces = [
        "Ok ",
        "<tool_",
        "call>",
        '{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}',
        "</tool_call>",
    ]
    events = decode(pieces, tools=True)
    assert content(events) == "Ok "
    assert logprob_tokens(events) == ["Ok "]
    calls = [event for event in events if isinstance(event, ToolCallMade)]
    assert [(call.index, call.name, json.loads(call.arguments)) for call in calls] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert events[-1].reason == "tool_calls"  # type: ignore[union-attr]


def test_decoder_max_tokens_ends_with_length() -> None:
    events = decode(["a", "b", "c"], max_tokens=2)
    assert content(events) == "ab"
    assert events[-1] == ChoiceEnded("length")


def test_decoder_parallel_tool_calls_off_keeps_the_first_call() -> None:
    vocabulary = {
        1000: '<tool_call>{"name": "a", "arguments": {}}</tool_call>',
        1001: '<tool_call>{"name": "b", "arguments": {}}</tool_call>',
    }
    decoder = ChoiceDecoder(
        FakeTokenizer(vocabulary),
        max_tokens=10,
        stop_strings=[],
        extractor=ToolCallExtractor(),
        parallel_tool_calls=False,
    )
    events = decoder.feed(GeneratedToken(1000)) + decoder.feed(GeneratedToken(1001))
    events += decoder.feed(GeneratedToken(END_OF_SEQUENCE, "stop"))
    assert [event.name for event in events if isinstance(event, ToolCallMade)] == ["a"]
    assert content(events) == ""
