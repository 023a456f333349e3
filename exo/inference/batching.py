"""Several requests in one forward pass, each row attending to its own cache: single-token steps,
or prompt chunks padded on the right to the longest.

The weight-heavy parts of a layer (projections, MLP) run once for the whole batch; attention runs
row by row against each request's own mlx-lm `KVCache`, unpadded and unmasked, exactly as that
request's step would run alone. So a request's cache never moves between batches (no merging,
padding or extraction when the set of requests changes from one step to the next, as it does in a
pipeline), and attention gives the same bits batched as alone.

mlx-lm's attention modules call the `scaled_dot_product_attention` of their own module with the
cache they were given; `enable_row_attention` wraps that function, per model module, so that a
`RowCaches` cache is attended row by row and every other cache goes to mlx-lm's function unchanged.
Rotary embeddings take the per-row offsets as an array, as mlx-lm's batch generation does.

Prompt chunks of different lengths are padded on the right: under the causal mask a real position
never sees a padded one, and the padded positions are trimmed from each row's cache after the pass
(their keys are overwritten by the next step), so each request's cache ends as if it ran alone.

Where batched and single rows can still differ is the matmul: with MKL, a float32 GEMM of 4 or more
rows picks another kernel than 1 to 3 rows and rounds differently (tests/test_inference_batching.py
bounds the difference); the reference BLAS gives identical rows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from exo.inference.shard import ShardModel

_WRAPPED_MARK = "_exo_row_attention"


class RowCaches:
    """One layer's caches of a batch, one mlx-lm cache per row, for a single-token step."""

    def __init__(self, caches: Sequence[Any]) -> None:
        self.caches = list(caches)

    @property
    def offset(self) -> mx.array:
        return mx.array([cache.offset for cache in self.caches])

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[list[mx.array], list[mx.array]]:
        rows = len(self.caches)
        fetched = [
            cache.update_and_fetch(row_keys, row_values)
            for cache, row_keys, row_values in zip(
                self.caches, mx.split(keys, rows, axis=0), mx.split(values, rows, axis=0), strict=True
            )
        ]
        return [row_keys for row_keys, _ in fetched], [row_values for _, row_values in fetched]


def _row_attention(original: Callable[..., mx.array]) -> Callable[..., mx.array]:
    def scaled_dot_product_attention(  # noqa: PLR0917 (mlx-lm's signature)
        queries: mx.array,
        keys: Any,
        values: Any,
        cache: Any,
        scale: float,
        mask: Any,
        sinks: mx.array | None = None,
    ) -> mx.array:
        if not isinstance(cache, RowCaches):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        rows = mx.split(queries, len(cache.caches), axis=0)
        row_mask = None if queries.shape[2] == 1 else mask  # prompt chunks: causal, as alone
        return mx.concatenate(
            [
                original(row, row_keys, row_values, cache=row_cache, scale=scale, mask=row_mask, sinks=sinks)
                for row, row_keys, row_values, row_cache in zip(rows, keys, values, cache.caches, strict=True)
            ],
            axis=0,
        )

    setattr(scaled_dot_product_attention, _WRAPPED_MARK, True)
    return scaled_dot_product_attention


def enable_row_attention(shard: ShardModel) -> bool:
    """Make the shard's attention modules accept `RowCaches`; False if one of them cannot (its
    module has no `scaled_dot_product_attention` to wrap), and then the stage must not batch."""
    modules = {type(getattr(layer, "self_attn", None)).__module__ for layer in shard.layers}
    found = [sys.modules.get(name) for name in modules]
    if not shard.layers or any(
        module is None or not callable(getattr(module, "scaled_dot_product_attention", None))
        for module in found
    ):
        return False
    for module in found:
        function = module.scaled_dot_product_attention  # type: ignore[union-attr]
        if not getattr(function, _WRAPPED_MARK, False):
            module.scaled_dot_product_attention = _row_attention(function)  # type: ignore[union-attr]
    return True


def forward_rows(shard: ShardModel, inputs: mx.array, caches: Sequence[Sequence[Any]]) -> mx.array:
    """One pass over a batch of single-token steps: `inputs` (B, 1) token ids on the first stage or
    (B, 1, H) hidden states, `caches[b]` row b's per-layer caches. Returns (B, 1, H or vocab)."""
    if inputs.shape[0] != len(caches) or inputs.shape[1] != 1:
        raise ValueError(f"a batch of {len(caches)} single-token rows cannot take inputs {inputs.shape}")
    layer_caches = [RowCaches([row[layer] for row in caches]) for layer in range(len(shard.layers))]
    return shard.forward(inputs, layer_caches)


def forward_chunks(
    shard: ShardModel, inputs: Sequence[mx.array], caches: Sequence[Sequence[Any]]
) -> list[mx.array]:
    """One pass over several requests' prompt chunks: `inputs[b]` (1, L_b) token ids on the first
    stage or (1, L_b, H) hidden states, `caches[b]` request b's per-layer caches. The chunks are
    padded on the right to the longest and the padding is trimmed from the caches afterwards.
    Returns each request's output, (1, L_b, H or vocab), unpadded."""
    if len(inputs) != len(caches) or not inputs:
        raise ValueError(f"{len(inputs)} chunks cannot go with {len(caches)} caches")
    lengths = [chunk.shape[1] for chunk in inputs]
    longest = max(lengths)
    padded = [
        chunk
        if length == longest
        else mx.pad(chunk, [(0, 0), (0, longest - length)] + [(0, 0)] * (chunk.ndim - 2))
        for chunk, length in zip(inputs, lengths, strict=True)
    ]
    layer_caches = [RowCaches([row[layer] for row in caches]) for layer in range(len(shard.layers))]
    output = shard.forward(mx.concatenate(padded, axis=0), layer_caches)
    for row_caches, length in zip(caches, lengths, strict=True):
        if length < longest:
            for layer_cache in row_caches:
                layer_cache.trim(longest - length)
    return [output[row : row + 1, :length] for row, length in enumerate(lengths)]
