"""A streamed answer split into content, reasoning and tool calls, as mlx-lm's server splits it.

mlx-lm's TextStateMachine (what its server streams with) finds the markers mlx-lm's tokenizer
wrapper knows for the model (`think_start`/`think_end`; the chosen tool parser's
`tool_call_start`/`tool_call_end`) in the text as it arrives, holding back a possible partial
marker; the text between a call's markers goes to that tool parser. What this module adds is what
exo's decoder needs and mlx-lm does not keep: offsets into the fed text, so that per-token
log-probabilities line up with the content that survived, and a call that does not parse is shown
as the text it was (mlx-lm's server drops it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from exo.api.tool_calls import CallPiece, ContentPiece, ParsedCall, Piece, ReasoningPiece, parse_call_object

Parse = Callable[[str], "list[ParsedCall] | None"]


class Markers(msgspec.Struct, frozen=True):
    think: tuple[str, str] | None = None  # (start, end)
    tool: tuple[str, str] | None = None  # (start, end); end "": a call runs to the end of the answer


def model_markers(tokenizer: object, *, tools: bool) -> Markers | None:
    """The markers mlx-lm found for this tokenizer (None: neither thinking nor a tool parser).
    Tool markers only when the request offers tools and mlx-lm chose a parser."""
    think = None
    if getattr(tokenizer, "has_thinking", False):
        think = (str(getattr(tokenizer, "think_start", "")), str(getattr(tokenizer, "think_end", "")))
    tool = None
    start = getattr(tokenizer, "tool_call_start", None)
    if tools and getattr(tokenizer, "tool_parser", None) is not None and start:
        tool = (str(start), str(getattr(tokenizer, "tool_call_end", None) or ""))
    return None if think is None and tool is None else Markers(think, tool)


def opens_thinking(tokenizer: object, prompt_tokens: list[int]) -> bool:
    """Whether the prompt ends inside a thinking block (the template opened it for the model)."""
    if not getattr(tokenizer, "has_thinking", False):
        return False
    rfind_start = getattr(tokenizer, "rfind_think_start", None)
    rfind_end = getattr(tokenizer, "rfind_think_end", None)
    if rfind_start is None or rfind_end is None:
        return False
    # A block the generation prompt opened is at its end: look at the tail only, as mlx-lm does.
    start = max(len(prompt_tokens) - 64, 0)
    return int(rfind_start(prompt_tokens, start=start)) > int(rfind_end(prompt_tokens, start=start))


def mlx_lm_parse(tokenizer: object, tools: list[dict[str, Any]]) -> Parse:
    """mlx-lm's tool parser for the model, its result as ParsedCalls (None: not a call)."""
    parser: Callable[[str, Any], Any] = getattr(tokenizer, "tool_parser")  # noqa: B009

    def parse(text: str) -> list[ParsedCall] | None:
        try:
            result = parser(text, tools)
        # A parser is per model family and raises what its code raises on text that is not a call
        # (ValueError, KeyError, IndexError...): the model wrote something else, shown as text.
        except Exception:
            return None
        items: list[object] = result if isinstance(result, list) else [result]  # pyright: ignore[reportUnknownVariableType]
        calls = [parse_call_object(item) for item in items]
        if not calls or any(call is None for call in calls):
            return None
        return [call for call in calls if call is not None]

    return parse


class OutputSplitter:
    """Streams text in; content, reasoning and call pieces out (the ToolCallExtractor interface).

    `initial` is "reasoning" when the prompt itself opened the thinking block (a template that
    ends its generation prompt with the think marker), as mlx-lm's server decides."""

    def __init__(self, markers: Markers, parse: Parse | None = None, initial: str = "normal") -> None:
        transitions: dict[str, list[tuple[str, str]]] = {"normal": []}
        if markers.think is not None:
            transitions["normal"].append((markers.think[0], "reasoning"))
            transitions["reasoning"] = [(markers.think[1], "normal")]
        if markers.tool is not None:
            start, end = markers.tool
            transitions["normal"].append((start, "tool"))
            if markers.think is not None:
                transitions["reasoning"].append((start, "tool"))
            transitions["tool"] = [(end, "normal")] if end else []
        # Imported here: mlx-lm loads MLX, which the node loads only after choosing its BLAS; a
        # tokenizer with markers to split on is an mlx-lm one, so MLX is loaded by then.
        from mlx_lm.generate import TextStateMachine

        self._machine = TextStateMachine
        self._transitions = transitions
        self._parse = parse
        machine = TextStateMachine(transitions)
        self._state: Any = machine.make_state(initial if initial in transitions else "normal")
        self._fed = ""
        self._position = 0  # offset in the fed text where the next segment starts
        self._call_start: int | None = None  # offset of the open call's start marker
        self._call_text = ""

    @property
    def decided(self) -> int:
        """Everything fed before this offset has come out as a piece."""
        if self._call_start is not None:
            return self._call_start
        return len(self._fed) - len(self._state[3])

    def feed(self, text: str) -> list[Piece]:
        self._fed += text
        self._state, segments = self._machine.split(self._state, text)
        return self._pieces(segments)

    def finish(self) -> list[Piece]:
        """The answer is complete: what is held is text of the current state; an open call is
        parsed as it stands."""
        self._state, held, state = self._machine.flush(self._state)
        pieces = self._pieces([(state, held)])
        if self._call_start is not None:
            pieces += self._close_call(len(self._fed))
        return pieces

    def _pieces(self, segments: list[tuple[str | None, str]]) -> list[Piece]:
        pieces: list[Piece] = []
        for index, (state, text) in enumerate(segments):
            start, end = self._position, self._position + len(text)
            if state == "tool":
                self._call_text += text
            elif text and state == "reasoning":
                pieces.append(ReasoningPiece(text, start, end))
            elif text:
                pieces.append(ContentPiece(text, start, end))
            self._position = end
            if index + 1 == len(segments):
                break
            marker = self._marker_at(state, end)  # a transition: the marker sits between the two
            following = segments[index + 1][0]
            self._position = end + len(marker)
            if following == "tool":
                self._call_start, self._call_text = end, ""
            elif state == "tool":
                pieces += self._close_call(self._position)
            else:
                pieces.append(ReasoningPiece("", end, self._position))  # a think marker: not content
        return pieces

    def _marker_at(self, state: str | None, position: int) -> str:
        candidates = [text for text, _ in self._transitions.get(state or "", []) if text]
        matching = [text for text in candidates if self._fed.startswith(text, position)]
        return max(matching, key=len, default="")

    def _close_call(self, end: int) -> list[Piece]:
        start, self._call_start = self._call_start, None
        assert start is not None
        calls = None if self._parse is None else self._parse(self._call_text)
        if calls is None:
            return [ContentPiece(self._fed[start:end], start, end)]
        return [CallPiece(call, start, end) for call in calls]
