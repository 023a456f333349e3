"""Tool calls in generated text, found as the text streams in (sans-IO), for tokenizers mlx-lm
chose no tool parser for: llama 3's bare-JSON calls, for which mlx-lm has no parser, and the Hermes
form in a template mlx-lm did not recognise. Models with an mlx-lm parser are split by
exo/api/channels.py with that parser.

Two forms are recognised:

- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, anywhere in the text,
  any number of times; text outside the tags is content.
- llama 3: the whole answer is a JSON object `{"name": ..., "parameters": {...}}` (or a list of
  them, or several separated by `;`), optionally after `<|python_tag|>`.

`ToolCallExtractor.feed(text)` returns what is decided so far, in order: content pieces and
parsed calls. Text that may still turn into a call (a partial `<tool_call>` tag, an answer that
starts with `{`) is held back until it is decided; a block that does not parse as a call is
content after all. Positions are offsets in the fed text, so a caller can line up per-token
log-probabilities with the content that survived.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


class ParsedCall(msgspec.Struct, frozen=True):
    name: str
    arguments: str  # compact JSON text of an object


class ContentPiece(msgspec.Struct, frozen=True):
    text: str
    start: int  # offsets in the text fed to the extractor
    end: int


class CallPiece(msgspec.Struct, frozen=True):
    call: ParsedCall
    start: int
    end: int


class ReasoningPiece(msgspec.Struct, frozen=True):
    """The model's thinking (text between its think markers; "" for a marker itself): not content."""

    text: str
    start: int
    end: int


Piece = ContentPiece | CallPiece | ReasoningPiece


def parse_call_object(value: object) -> ParsedCall | None:
    """`{"name": str, "arguments" | "parameters": object-or-JSON-text}` -> a call, else None."""
    if not isinstance(value, dict):
        return None
    fields: dict[str, Any] = value  # pyright: ignore[reportUnknownVariableType]
    name = fields.get("name")
    arguments = fields.get("arguments", fields.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


def parse_hermes_body(body: str) -> ParsedCall | None:
    """The JSON between `<tool_call>` and `</tool_call>`."""
    try:
        return parse_call_object(json.loads(body))
    except ValueError:
        return None


def parse_json_calls(text: str) -> list[ParsedCall] | None:
    """A whole answer in the llama 3 form: one object, a list of them, or objects joined by `;`."""
    stripped = text.strip().removeprefix(PYTHON_TAG).strip()
    if not stripped:
        return None
    try:
        candidates: list[object] = [json.loads(stripped)]
    except ValueError:
        try:
            candidates = [json.loads(part) for part in stripped.split(";") if part.strip()]
        except ValueError:
            return None
    if len(candidates) == 1 and isinstance(candidates[0], list):
        candidates = list(candidates[0])  # pyright: ignore[reportUnknownArgumentType]
    calls = [parse_call_object(candidate) for candidate in candidates]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def parse_tool_calls(text: str) -> tuple[str, list[ParsedCall]]:
    """A finished answer -> (content, calls): the non-streaming form of ToolCallExtractor."""
    extractor = ToolCallExtractor()
    pieces = extractor.feed(text) + extractor.finish()
    content = "".join(piece.text for piece in pieces if isinstance(piece, ContentPiece))
    return content, [piece.call for piece in pieces if isinstance(piece, CallPiece)]


Mode = Literal["start", "text", "call", "json"]


class ToolCallExtractor:
    """Streams text in, content and calls out. `forced_prefix` is text the prompt already wrote
    for the model (a `<tool_call>` opener when a call is required): it is parsed, never shown."""

    def __init__(self, forced_prefix: str = "") -> None:
        self._mode: Mode = "start"
        self._buffer = ""  # fed text not decided yet
        self._buffer_start = 0  # offset of _buffer[0] in the fed text
        self._virtual = ""  # forced text in front of the buffer, with no offsets of its own
        if forced_prefix.startswith(HERMES_OPEN):
            self._mode = "call"
            self._virtual = forced_prefix.removeprefix(HERMES_OPEN)
        elif forced_prefix:
            self._mode = "json"
            self._virtual = forced_prefix

    @property
    def decided(self) -> int:
        """Everything fed before this offset has come out as a piece."""
        return self._buffer_start

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while True:
            before = (self._mode, len(self._buffer))
            match self._mode:
                case "start":
                    self._decide_start()
                case "text":
                    pieces += self._scan_text()
                case "call":
                    pieces += self._scan_call(final=False)
                case "json":
                    pass  # decided only at the end
            if (self._mode, len(self._buffer)) == before:
                return pieces

    def finish(self) -> list[Piece]:
        """The answer is complete: decide whatever is held."""
        pieces: list[Piece] = []
        while self._mode == "call":  # an unclosed call: parse what there is
            pieces += self._scan_call(final=True)
            pieces += self.feed("")
        if self._mode == "json":
            calls = parse_json_calls(self._virtual + self._buffer)
            if calls is not None:
                end = self._buffer_start + len(self._buffer)
                pieces += [CallPiece(call, self._buffer_start, end) for call in calls]
                self._take(len(self._buffer))
        if self._buffer:
            pieces.append(self._content(len(self._buffer)))
        return pieces

    # --- states ---------------------------------------------------------------------------

    def _decide_start(self) -> None:
        stripped = self._buffer.lstrip()
        if not stripped:
            return
        if stripped.startswith(("{", "[", PYTHON_TAG)):
            self._mode = "json"
        elif PYTHON_TAG.startswith(stripped):
            return  # maybe the tag, not complete yet
        else:
            self._mode = "text"

    def _scan_text(self) -> list[Piece]:
        at = self._buffer.find(HERMES_OPEN)
        if at >= 0:
            pieces: list[Piece] = [self._content(at)] if at else []
            self._mode = "call"
            return pieces
        keep = _partial_suffix(self._buffer, HERMES_OPEN)
        shown = len(self._buffer) - keep
        return [self._content(shown)] if shown else []

    def _scan_call(self, *, final: bool) -> list[Piece]:
        """The buffer starts with `<tool_call>` (unless it was forced); wait for the close."""
        opener = "" if self._virtual else HERMES_OPEN
        if opener and not self._buffer.startswith(opener):
            self._mode = "text"
            return []
        at = self._buffer.find(HERMES_CLOSE, len(opener))
        if at < 0 and not final:
            return []
        end = len(self._buffer) if at < 0 else at + len(HERMES_CLOSE)
        body = self._virtual + self._buffer[len(opener) : at if at >= 0 else end]
        call = parse_hermes_body(body.strip())
        self._virtual = ""
        self._mode = "text"
        if call is None:
            return [self._content(end)]
        piece = CallPiece(call, self._buffer_start, self._buffer_start + end)
        self._take(end)
        return [piece]

    # --- helpers --------------------------------------------------------------------------

    def _content(self, length: int) -> ContentPiece:
        piece = ContentPiece(self._buffer[:length], self._buffer_start, self._buffer_start + length)
        self._take(length)
        return piece

    def _take(self, length: int) -> None:
        self._buffer = self._buffer[length:]
        self._buffer_start += length


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that `marker` starts with (a tag still arriving)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0
