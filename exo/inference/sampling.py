"""Token samplers: (temperature, top_p, top_k, seed) -> a callable from log-probabilities to a token.

Greedy (temperature 0) is argmax over the same log-probabilities mlx-lm computes, so it picks the
same token as mlx-lm's greedy sampler. Random sampling draws from a per-request key chain seeded by
`seed`, independent of MLX's global random state, so the same seed reproduces the same tokens
whichever stage or process samples.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import mlx.core as mx

from exo.inference.protocol import SamplingParams

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
