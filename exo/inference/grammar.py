"""Constrained decoding where tokens are sampled: a request's GrammarSpec -> the allowed tokens.

llguidance compiles the grammar (a Lark grammar with JSON schemas embedded) against the model's
tokenizer and, at each step, fills a bitmask of the tokens that keep the output inside it. It was
chosen over xgrammar (which needs PyTorch) and outlines-core (JSON schemas only as regexes, and
4x slower per step on exo-tiny's vocabulary): see docs/inference.md. The mask is applied to the
logits by the request's TokenSampler, so it works the same in a batch and on any pipeline.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import llguidance
import llguidance.numpy as llguidance_numpy
import mlx.core as mx
import numpy as np

from exo.core.sampling import GrammarSpec


class GrammarError(ValueError):
    """The grammar cannot be used with this model (it does not compile, no tokenizer.json...)."""


@functools.lru_cache(maxsize=8)
def grammar_tokenizer(
    model_path: str, vocab_size: int, eos_token_ids: tuple[int, ...]
) -> llguidance.LLTokenizer:
    """llguidance's view of the model's vocabulary (built once per model: about a second for a
    150k-token vocabulary). Read from tokenizer.json, so the runner needs no transformers."""
    path = Path(model_path) / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise GrammarError(f"constrained decoding needs the model's tokenizer.json: {error}") from None
    try:
        return llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos_token_ids))
    except (ValueError, RuntimeError) as error:
        raise GrammarError(f"llguidance cannot read {path}: {error}") from None


class GrammarConstraint:
    """One request's grammar state: `mask()` before each draw, `accept(token)` after it."""

    def __init__(self, spec: GrammarSpec, tokenizer: llguidance.LLTokenizer) -> None:
        self._spec = spec
        self._matcher = llguidance.LLMatcher(
            tokenizer, llguidance.LLMatcher.grammar_from_lark(spec.lark), log_level=0
        )
        if self._matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {self._matcher.get_error()}")
        self._vocab = tokenizer.vocab_size
        self._eos = frozenset(tokenizer.eos_tokens)
        self._bits = llguidance_numpy.allocate_token_bitmask(1, self._vocab)
        self._active = not spec.trigger
        self._ended = False  # a triggered grammar with `then` "end" is complete: only EOS now
        self._recent: list[int] = []  # the last tokens while free, to spot the trigger

    @property
    def active(self) -> bool:
        return self._active

    def mask(self) -> mx.array | None:
        """(1, vocab) booleans, True where a token is allowed; None while the output is free."""
        if self._ended or (self._active and self._matcher.is_error()):
            return self._only_eos()
        if not self._active:
            return None
        llguidance_numpy.fill_next_token_bitmask(self._matcher, self._bits)
        allowed = np.unpackbits(self._bits.view(np.uint8), axis=-1, bitorder="little")[:, : self._vocab]
        if not allowed.any():  # cannot happen with a valid grammar; end rather than draw from nothing
            return self._only_eos()
        return mx.array(allowed.astype(np.bool_))  # pyright: ignore[reportArgumentType]

    def accept(self, token: int) -> None:
        if self._ended:
            return
        if not self._active:
            self._watch_trigger(token)
            return
        if token in self._eos:
            return
        # A token the mask did not allow (never, unless the caller skipped it) puts the matcher in
        # its error state, and the next masks then allow only EOS.
        self._matcher.consume_token(token)
        if self._spec.trigger and self._matcher.is_stopped():
            if self._spec.then == "end":
                self._ended = True
            else:
                self._active = False

    def _watch_trigger(self, token: int) -> None:
        trigger = self._spec.trigger
        self._recent.append(token)
        del self._recent[: -len(trigger)]
        if self._recent == trigger:
            self._recent = []
            self._matcher.reset()
            self._active = True

    def _only_eos(self) -> mx.array:
        allowed = np.zeros((1, self._vocab), dtype=np.bool_)
        allowed[0, [token for token in self._eos if token < self._vocab]] = True
        return mx.array(allowed)  # pyright: ignore[reportArgumentType]


def make_constraint(
    spec: GrammarSpec, model_path: Path | None, vocab_size: int, eos_token_ids: Sequence[int]
) -> GrammarConstraint:
    if model_path is None:
        raise GrammarError("constrained decoding needs the model's folder, which this stage does not know")
    tokenizer = grammar_tokenizer(str(model_path), vocab_size, tuple(sorted(eos_token_ids)))
    return GrammarConstraint(spec, tokenizer)
