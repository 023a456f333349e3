"""One choice's tokens -> what a client sees (sans-IO): text, tool calls, log-probabilities, the end.

Tokens go through three stages, each of which may hold text back until it is decided:
the detokenizer (a partial UTF-8 character), the stop strings (text that may start one), and,
when tools are on, the tool-call extractor (a partial `<tool_call>`, an answer that starts with
`{`). Offsets into the raw generated text tie each token's log-probability to the content that
survived, so the tokens of the `logprobs` list always join to exactly the content.
"""

from __future__ import annotations

from collections import deque
from typing import Literal, Protocol

import msgspec

from exo.api.cluster_port import ChatTokenizer, GeneratedToken, text_tokenizer
from exo.api.openai_types import TokenLogprob, TopLogprob
from exo.api.stop_strings import StopStringMatcher
from exo.api.tool_calls import CallPiece, ContentPiece, Piece, ReasoningPiece

EndReason = Literal["stop", "length", "tool_calls"]


class TextDelta(msgspec.Struct, frozen=True):
    text: str
    # Tokens decided by this step (with logprobs on); their texts join, over the whole choice,
    # to the content, though one delta's tokens need not match its text.
    logprobs: list[TokenLogprob] = []


class ReasoningDelta(msgspec.Struct, frozen=True):
    """The model's thinking, separated from the content (`reasoning_content`, Claude `thinking`
    blocks, Ollama `thinking`, Responses `reasoning` items)."""

    text: str


class ToolCallMade(msgspec.Struct, frozen=True):
    index: int  # among this choice's calls
    id: str
    name: str
    arguments: str


class ChoiceEnded(msgspec.Struct, frozen=True):
    reason: EndReason
    stop_sequence: str | None = None  # the stop string that ended it, if one did
    end_of_sequence: bool = False  # the model ended it itself


ChoiceEvent = TextDelta | ReasoningDelta | ToolCallMade | ChoiceEnded


class Extractor(Protocol):
    """Finds what is not content in the text (ToolCallExtractor, channels.OutputSplitter)."""

    @property
    def decided(self) -> int: ...

    def feed(self, text: str) -> list[Piece]: ...

    def finish(self) -> list[Piece]: ...


class _PendingToken(msgspec.Struct):
    start: int
    end: int
    logprob: float
    top: list[tuple[int, float]]


class ChoiceDecoder:
    def __init__(
        self,
        tokenizer: ChatTokenizer,
        *,
        max_tokens: int,
        stop_strings: list[str],
        extractor: Extractor | None = None,
        parallel_tool_calls: bool = True,
        call_id_prefix: str = "call",
    ) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer
        self._end_of_sequence = set(tokenizer.eos_token_ids)
        self._max_tokens = max_tokens
        self._matcher = StopStringMatcher(stop_strings)
        self._extractor = extractor
        self._parallel = parallel_tool_calls
        self._call_id_prefix = call_id_prefix
        self._raw = ""  # all text the detokenizer produced
        self._released = 0  # raw text the stop matcher let through
        self._pending: deque[_PendingToken] = deque()
        self._removed: list[tuple[int, int]] = []  # raw spans that are not content (calls, cut text)
        self._calls = 0
        self.completion_tokens = 0
        self.cached_tokens: int | None = None  # prompt tokens the prefix cache served, when reported
        self.ended: ChoiceEnded | None = None

    def feed(self, token: GeneratedToken) -> list[ChoiceEvent]:
        if self.ended is not None:
            return []
        if token.cached_tokens is not None:
            self.cached_tokens = max(self.cached_tokens or 0, token.cached_tokens)
        reason: Literal["stop", "length"] | None = token.finish_reason
        end_of_sequence = token.token_id in self._end_of_sequence
        if end_of_sequence:
            reason = "stop"
        else:
            self.completion_tokens += 1
            self._detokenizer.add_token(token.token_id)
            if reason is None and self.completion_tokens >= self._max_tokens:
                reason = "length"
        if reason is not None:
            self._detokenizer.finalize()
        start = len(self._raw)
        self._raw += self._detokenizer.last_segment
        if token.logprob is not None and not end_of_sequence:
            self._pending.append(
                _PendingToken(start, len(self._raw), token.logprob, token.top_logprobs or [])
            )
        events = self._advance(self._raw[start:])
        if self._matcher.stopped:
            return events + self._end("stop", stop_sequence=self._matcher.matched)
        if reason is not None:
            return events + self._end(reason, end_of_sequence=end_of_sequence)
        return events

    def close(self) -> list[ChoiceEvent]:
        """The token stream ended without a finish reason (or was cancelled): a natural stop."""
        if self.ended is not None:
            return []
        self._detokenizer.finalize()
        start = len(self._raw)
        self._raw += self._detokenizer.last_segment
        return self._advance(self._raw[start:]) + self._end("stop")

    # --- internals --------------------------------------------------------------------------

    def _advance(self, text: str) -> list[ChoiceEvent]:
        released = self._matcher.feed(text)
        self._released += len(released)
        if self._matcher.stopped:
            self._removed.append((self._released, len(self._raw)))
        if self._extractor is None:
            pieces: list[Piece] = [ContentPiece(released, self._released - len(released), self._released)]
            return self._emit(pieces, decided=self._released)
        return self._emit(self._extractor.feed(released), decided=self._extractor.decided)

    def _end(
        self, reason: EndReason, *, stop_sequence: str | None = None, end_of_sequence: bool = False
    ) -> list[ChoiceEvent]:
        events: list[ChoiceEvent] = []
        held = self._matcher.flush()
        self._released += len(held)
        if self._extractor is None:
            events += self._emit(
                [ContentPiece(held, self._released - len(held), self._released)], len(self._raw)
            )
        else:
            pieces = self._extractor.feed(held) + self._extractor.finish()
            events += self._emit(pieces, decided=len(self._raw))
        if self._calls and reason == "stop":
            reason = "tool_calls"
        self.ended = ChoiceEnded(reason, stop_sequence, end_of_sequence)
        return [*events, self.ended]

    def _emit(self, pieces: list[Piece], decided: int) -> list[ChoiceEvent]:
        events: list[ChoiceEvent] = []
        text = ""
        for piece in pieces:
            if isinstance(piece, ContentPiece):
                text += piece.text
                continue
            self._removed.append((piece.start, piece.end))
            if isinstance(piece, ReasoningPiece):
                if piece.text:
                    if text:
                        events.append(TextDelta(text))
                        text = ""
                    events.append(ReasoningDelta(piece.text))
                continue
            assert isinstance(piece, CallPiece)
            if self._calls and not self._parallel:
                continue  # parallel_tool_calls false: the first call only
            if text:
                events.append(TextDelta(text))
                text = ""
            call_id = f"{self._call_id_prefix}_{self._calls}"
            events.append(ToolCallMade(self._calls, call_id, piece.call.name, piece.call.arguments))
            self._calls += 1
        logprobs = self._decided_logprobs(decided)
        if text or logprobs:
            events.append(TextDelta(text, logprobs))
        return events

    def _decided_logprobs(self, decided: int) -> list[TokenLogprob]:
        entries: list[TokenLogprob] = []
        while self._pending and self._pending[0].end <= decided:
            pending = self._pending.popleft()
            text = self._content_of(pending.start, pending.end)
            if text is None:
                continue
            top = [self._top_entry(token, logprob) for token, logprob in pending.top]
            entries.append(TokenLogprob(text, pending.logprob, list(text.encode()), top))
        return entries

    def _content_of(self, start: int, end: int) -> str | None:
        """The part of raw[start:end] that is content; None when the token is wholly removed."""
        if start == end:  # a token that only completes later (partial UTF-8): keep it in place
            inside = any(removed_start <= start < removed_end for removed_start, removed_end in self._removed)
            return None if inside else ""
        kept = [True] * (end - start)
        for removed_start, removed_end in self._removed:
            for position in range(max(start, removed_start), min(end, removed_end)):
                kept[position - start] = False
        if not any(kept):
            return None
        return "".join(character for character, keep in zip(self._raw[start:end], kept, strict=True) if keep)

    def _top_entry(self, token: int, logprob: float) -> TopLogprob:
        text = text_tokenizer(self._tokenizer).decode([token])
        return TopLogprob(text, logprob, list(text.encode()))
