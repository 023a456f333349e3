"""Token samplers: (temperature, top_p, top_k, seed) -> a callable from log-probabilities to a token,
and `TokenSampler`, one request's sampler with penalties, logit bias, min_p and log-probabilities.

Greedy (temperature 0) is argmax over the same log-probabilities mlx-lm computes, so it picks the
same token as mlx-lm's greedy sampler. Random sampling draws from a per-request key chain seeded by
`seed`, independent of MLX's global random state, so the same seed reproduces the same tokens
whichever stage or process samples.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import mlx.core as mx

from exo.core.sampling import SamplingParams

Sampler = Callable[[mx.array], mx.array]  # log-probabilities (1, vocab) -> token ids (1,)


def logprobs_from_logits(logits: mx.array) -> mx.array:
    """As mlx-lm's generate_step: last position's logits minus their logsumexp."""
    last = logits[:, -1, :]
    return last - mx.logsumexp(last, keepdims=True)


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def keep_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    vocab = logprobs.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return logprobs
    dropped = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logprobs, dropped, mx.array(-float("inf"), logprobs.dtype), axis=-1)


def keep_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Smallest set of most likely tokens whose probability reaches top_p (never empty)."""
    if top_p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_probs = mx.exp(mx.take_along_axis(logprobs, order, axis=-1))
    before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = before < top_p
    keep = mx.put_along_axis(mx.zeros(logprobs.shape, dtype=mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, mx.array(-float("inf"), logprobs.dtype))


class SeededSampler:
    """Temperature sampling after top-k / top-p cuts, with its own key chain."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._key = mx.random.key(seed)

    def __call__(self, logprobs: mx.array) -> mx.array:
        keys = mx.random.split(self._key, num=2)
        self._key, draw_key = keys[0], keys[1]
        cut = keep_top_p(keep_top_k(logprobs, self.params.top_k), self.params.top_p)
        return mx.random.categorical(cut * (1.0 / self.params.temperature), axis=-1, key=draw_key)


def make_sampler(params: SamplingParams) -> Sampler:
    if params.temperature == 0.0:
        return greedy
    return SeededSampler(params)


class SampledToken(NamedTuple):
    token: int
    logprob: float | None = None  # the model's, before penalties, bias, temperature and cuts
    top_logprobs: list[tuple[int, float]] | None = None  # most likely first


def needs_processing(params: SamplingParams) -> bool:
    """Whether anything but temperature/top-k/top-p shapes the draw (greedy stays mlx-lm's path)."""
    return bool(
        params.min_p
        or params.presence_penalty
        or params.frequency_penalty
        or params.repetition_penalty != 1.0
        or params.logit_bias
    )


class Constraint(Protocol):
    """Which tokens may come next (a grammar: exo/inference/grammar.py), told each drawn token."""

    def mask(self) -> mx.array | None:
        """(1, vocab) booleans, True where allowed; None: no constraint at this step."""
        ...

    def accept(self, token: int) -> None: ...


class TokenSampler:
    """One request's sampling on the last stage: logits -> token (+ log-probabilities).

    Without penalties, bias or min_p it is exactly `make_sampler(params)` over mlx-lm's
    log-probabilities. Otherwise, on the last position's logits: the repetition penalty over the
    prompt and output tokens (mlx-lm's rule: negative logits multiplied, positive divided),
    `logit_bias` added, presence/frequency penalties subtracted per output token (OpenAI's rule),
    then the min_p cut, then the usual draw. Output counts are kept here, so it is stateful.

    A `constraint` (a grammar) masks the tokens it does not allow, last, before the draw. Its mask
    depends on every token drawn before, yet a stage may draw the next step before it `accept`s
    this one (it queued the next step on the uncomputed token): `draw` then waits for the drawn
    tokens it has not seen and tells the constraint itself, so feeding ahead still works.
    """

    def __init__(
        self, params: SamplingParams, prompt_tokens: Sequence[int] = (), constraint: Constraint | None = None
    ) -> None:
        self.params = params
        self._constraint = constraint
        self._unseen: deque[mx.array] = deque()  # drawn tokens the constraint has not been told
        self._told = 0  # tokens the constraint has been told
        self._accepted = 0  # tokens `accept`ed
        self._draw = make_sampler(params)
        self._processing = needs_processing(params)
        self._output_counts: dict[int, int] = {}
        self._seen: set[int] = set(prompt_tokens) if params.repetition_penalty != 1.0 else set()
        self._bias: tuple[mx.array, mx.array] | None = None
        if params.logit_bias:
            self._bias = (mx.array(list(params.logit_bias)), mx.array(list(params.logit_bias.values())))

    @property
    def depends_on_output(self) -> bool:
        """Whether the next draw depends on the tokens drawn so far (the penalties): such a sampler
        must `accept` each token before the next `draw`."""
        params = self.params
        return bool(params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty)

    def __call__(self, logits: mx.array) -> SampledToken:
        token, logprobs = self.draw(logits)
        return self.accept(int(token.item()), logprobs)  # pyright: ignore[reportArgumentType]

    def draw(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """The token as a lazy (1,) array and the model's log-probabilities; `accept` the token
        once evaluated. Split so that a batch's rows are evaluated together (`sample_rows`)."""
        logprobs = logprobs_from_logits(logits)
        processed = self._process(logits[:, -1, :]) if self._processing else logprobs
        if self._constraint is None:
            return self._draw(processed), logprobs
        while self._unseen:
            self._constraint.accept(int(self._unseen.popleft().item()))  # pyright: ignore[reportArgumentType]
            self._told += 1
        allowed = self._constraint.mask()
        if allowed is not None:
            processed = mx.where(allowed, processed, mx.array(-float("inf"), processed.dtype))
        token = self._draw(processed)
        self._unseen.append(token)
        return token, logprobs

    def accept(self, token: int, logprobs: mx.array) -> SampledToken:
        if self._constraint is not None:
            self._accepted += 1
            if self._accepted > self._told:  # not told by a later draw already
                self._unseen.popleft()
                self._constraint.accept(token)
                self._told += 1
        self._output_counts[token] = self._output_counts.get(token, 0) + 1
        if self.params.repetition_penalty != 1.0:
            self._seen.add(token)
        if not self.params.logprobs:
            return SampledToken(token)
        return SampledToken(token, float(logprobs[0, token].item()), self._top(logprobs))  # pyright: ignore[reportArgumentType]

    def _process(self, last: mx.array) -> mx.array:
        params = self.params
        vocab = last.shape[-1]
        seen_in_vocab = [token for token in self._seen if token < vocab]
        if seen_in_vocab:
            seen = mx.array(seen_in_vocab)
            selected = last[:, seen]
            penalised = mx.where(
                selected < 0, selected * params.repetition_penalty, selected / params.repetition_penalty
            )
            last = last.at[:, seen].add(penalised - selected)
        if self._bias is not None:
            tokens, values = self._bias
            in_vocab = tokens < vocab
            last = last.at[:, mx.where(in_vocab, tokens, 0)].add(mx.where(in_vocab, values, 0.0))
        if (params.presence_penalty or params.frequency_penalty) and self._output_counts:
            tokens = mx.array(list(self._output_counts))
            counts = mx.array(list(self._output_counts.values()), dtype=last.dtype)
            penalty = counts * params.frequency_penalty + params.presence_penalty
            last = last.at[:, tokens].add(-penalty)
        processed = last - mx.logsumexp(last, axis=-1, keepdims=True)
        if params.min_p > 0.0:
            floor = mx.max(processed, axis=-1, keepdims=True) + math.log(params.min_p)
            processed = mx.where(processed >= floor, processed, mx.array(-float("inf"), processed.dtype))
        return processed

    def _top(self, logprobs: mx.array) -> list[tuple[int, float]] | None:
        count = min(self.params.top_logprobs, logprobs.shape[-1])
        if count == 0:
            return []
        candidates = mx.argpartition(-logprobs[0], kth=count - 1)[:count]
        values = logprobs[0, candidates]
        order = mx.argsort(-values)
        tokens, scores = candidates[order].tolist(), values[order].tolist()
        return [(int(token), float(score)) for token, score in zip(tokens, scores, strict=True)]  # pyright: ignore[reportArgumentType, reportCallIssue]


class DrawnRows(NamedTuple):
    """A batch's tokens, drawn but perhaps not yet computed (`tokens` is lazy, one per row)."""

    tokens: mx.array
    logprobs: list[mx.array]


def draw_rows(samplers: Sequence[TokenSampler], rows: Sequence[mx.array]) -> DrawnRows:
    """Each row's logits (1, L, vocab) through its request's sampler, as one lazy (rows,) array:
    evaluated once for all rows instead of once per row."""
    drawn = [sampler.draw(row) for sampler, row in zip(samplers, rows, strict=True)]
    tokens = mx.concatenate([token.reshape(-1) for token, _ in drawn])
    return DrawnRows(tokens, [logprobs for _, logprobs in drawn])


def accept_rows(samplers: Sequence[TokenSampler], drawn: DrawnRows) -> list[SampledToken]:
    """Wait for the drawn tokens and hand each to its sampler (counts, log-probabilities)."""
    tokens = drawn.tokens.tolist()
    assert isinstance(tokens, list)
    return [
        sampler.accept(int(token), logprobs)  # pyright: ignore[reportArgumentType]
        for sampler, token, logprobs in zip(samplers, tokens, drawn.logprobs, strict=True)
    ]


def sample_rows(samplers: Sequence[TokenSampler], rows: Sequence[mx.array]) -> list[SampledToken]:
    """The same tokens as calling each sampler in turn, with one evaluation for all rows."""
    return accept_rows(samplers, draw_rows(samplers, rows))
