"""One forward pass over the work a stage's scheduler chose, and what it produces.

A pass is one request's chunk or step, several requests' single-token steps (`forward_rows`), or
several requests' prompt chunks padded to the longest (`forward_chunks`). A stage that is not the
last sends the hidden states on; the last one samples the rows that sample, evaluating every row's
token at once, and otherwise only makes the caches real.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import mlx.core as mx

from exo.inference.batching import forward_chunks, forward_rows
from exo.inference.frames import Outgoing, activation_frames
from exo.inference.request_state import RequestState, StageCounters
from exo.inference.sampling import SampledToken, TokenSampler, sample_rows
from exo.inference.scheduler import Work
from exo.inference.shard import ShardModel

Batch = list[tuple[RequestState, Work]]


class PassResult(NamedTuple):
    outgoing: list[Outgoing]  # hidden states for the next stage
    sampled: list[SampledToken]  # the last stage's tokens, one per row of the batch (or none)


def run_pass(shard: ShardModel, batch: Batch, counters: StageCounters) -> PassResult:
    if len(batch) > 1 and not batch[0][1].batchable:
        return _run_chunks(shard, batch, counters)
    return _run_steps(shard, batch, counters)


def _run_steps(shard: ShardModel, batch: Batch, counters: StageCounters) -> PassResult:
    """One request's pass, or several requests' single-token steps."""
    if len(batch) == 1:
        state, work = batch[0]
        output = shard.forward(work.inputs, state.cache)
    else:
        inputs = mx.concatenate([work.inputs for _, work in batch], axis=0)
        output = forward_rows(shard, inputs, [state.cache for state, _ in batch])
        counters.batched_steps += 1
        counters.batched_rows += len(batch)
    if not shard.spec.is_last:
        rows = [(state.next_address or "", state.request_id, work.step) for state, work in batch]
        return PassResult(activation_frames(rows, output, batch[0][1].sample), [])
    if not batch[0][1].sample:  # a prompt chunk before the last: only the cache matters
        mx.eval([layer_cache.state for layer_cache in batch[0][0].cache])
        return PassResult([], [])
    logits = [output[row : row + 1] for row in range(len(batch))] if len(batch) > 1 else [output]
    samplers = [state.sampler for state, _ in batch]
    assert all(sampler is not None for sampler in samplers)
    return PassResult([], sample_rows(cast("list[TokenSampler]", samplers), logits))


def _run_chunks(shard: ShardModel, batch: Batch, counters: StageCounters) -> PassResult:
    """Several requests' prompt chunks (none sampled) in one padded pass."""
    outputs = forward_chunks(shard, [work.inputs for _, work in batch], [state.cache for state, _ in batch])
    counters.batched_steps += 1
    counters.batched_rows += len(batch)
    counters.grouped_prompt_chunks += len(batch)
    if shard.spec.is_last:
        mx.eval([layer_cache.state for state, _ in batch for layer_cache in state.cache])
        return PassResult([], [])
    mx.eval(outputs)
    outgoing = [
        item
        for (state, work), output in zip(batch, outputs, strict=True)
        for item in activation_frames(
            [(state.next_address or "", state.request_id, work.step)], mx.contiguous(output), False
        )
    ]
    return PassResult(outgoing, [])
