"""A tensor rank's share of the output head: its rows of the vocabulary, gathered into full logits.

mlx-lm's `model.shard` splits the layers' projections only: every rank would still hold the whole
output head (vocab x hidden; 197 MB of a 32,000-token float32 model at hidden 1,536) and read all
of it every token. Here each of N ranks holds rows [r*S, min(V, (r+1)*S)) with S = ceil(V/N),
computes the logits of those tokens, and one `mx.distributed.all_gather` assembles the full row
(the last rank pads its short slice's logits with zeros, which the gather's trim drops), so the
sampler, grammar masks, logprobs and penalties see exactly the logits one process would.

With tied embeddings the same slice also serves the input lookup: each rank looks up the tokens in
its rows, zeros the others, and an `all_sum` adds the one non-zero contribution (exact: x + 0 = x),
so a rank holds 1/N of the embedding matrix instead of all of it. An untied model keeps its
embedding whole (a lookup reads a few rows; sharding it would only save memory at a collective's
latency per pass).

The slice is taken from the checkpoint's module (quantized or not) before the float32 upcast, so a
4-bit head is dequantized (or kept packed for exo's kernel) for this rank's rows only.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
from mlx import nn


def vocab_rows(vocab: int, size: int, rank: int) -> tuple[int, int, int]:
    """(start, rows, padded): rank `rank` of `size` holds `rows` tokens from `start`, and its
    logits are padded to `padded` = ceil(vocab/size) for the gather (equal shapes on every rank)."""
    if vocab < 1 or size < 1 or not 0 <= rank < size:
        raise ValueError(f"no vocabulary slice for rank {rank} of {size} over {vocab} tokens")
    padded = -(-vocab // size)
    start = min(vocab, rank * padded)
    return start, min(vocab, start + padded) - start, padded


def _sliced(module: nn.Module, vocab: int, start: int, rows: int) -> nn.Module:
    """A shallow copy of `module` whose vocabulary-sized parameters keep only rows [start, start+rows):
    weight, and for a quantized module its scales and biases (quantization groups run along the
    hidden axis, so whole rows slice cleanly), and an output bias."""
    part = copy.copy(module)
    for name, value in module.items():
        if isinstance(value, mx.array) and value.ndim >= 1 and value.shape[0] == vocab:
            part[name] = mx.contiguous(value[start : start + rows])
    return part


class VocabShard(nn.Module):
    """The interface of mlx's `nn.Embedding` (a lookup as the call, `as_linear` for the head) over
    one rank's rows of the vocabulary; both results are whole, as on one process."""

    def __init__(self, source: nn.Module, vocab: int, group: Any) -> None:
        super().__init__()
        self.vocab = vocab
        self.start, self.rows, self.padded = vocab_rows(vocab, group.size(), group.rank())
        self.group = group
        self.part = _sliced(source, vocab, self.start, self.rows)

    def __call__(self, ids: mx.array) -> mx.array:
        """The embeddings of `ids`: this rank's rows where it holds the token, zeros elsewhere,
        summed over the ranks."""
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        found = self.part(mx.where(inside, local, 0))
        return mx.distributed.all_sum(mx.where(inside[..., None], found, 0), group=self.group)

    def as_linear(self, hidden: mx.array) -> mx.array:
        """The logits of every token of the vocabulary for `hidden` (..., H): (..., V)."""
        part: Any = self.part  # an Embedding's rows (as_linear) or a Linear's
        local = part.as_linear(hidden) if hasattr(part, "as_linear") else part(hidden)
        if self.rows < self.padded:
            pad = mx.zeros((*local.shape[:-1], self.padded - self.rows), dtype=local.dtype)
            local = mx.concatenate([local, pad], axis=-1)
        # all_gather concatenates along the first axis: put the vocabulary there and back.
        gathered = mx.distributed.all_gather(mx.moveaxis(local, -1, 0), group=self.group)
        logits = mx.moveaxis(gathered, 0, -1)
        return logits if gathered.shape[0] == self.vocab else logits[..., : self.vocab]
