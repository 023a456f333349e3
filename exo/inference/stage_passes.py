"""One forward pass over the work a stage's scheduler chose: launched, then finished.

A pass is one request's chunk or step, several requests' single-token steps (`forward_rows`), or
several requests' prompt chunks padded to the longest (`forward_chunks`). `launch_pass` builds the
pass's graph and hands it to MLX (`mx.async_eval`), which computes it on its own thread; `finish`
waits for the result. In between, a stage may build its next pass (see PipelineStage.run_next), as
mlx-lm's generate_step does. A stage that is not the last sends the hidden states on; the last one
samples the rows that sample, drawing every row's token at once, and otherwise only makes the
caches real. A sampling pass's tokens are available before they are computed (`next_input`), so a
stage that is both first and last can queue each request's next step on them straight away.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx

from exo.inference.batching import forward_chunks, forward_rows
from exo.inference.frames import Outgoing, activation_frames
from exo.inference.request_state import RequestState, StageCounters
from exo.inference.sampling import DrawnRows, SampledToken, TokenSampler, accept_rows, draw_rows
from exo.inference.scheduler import Work
from exo.inference.shard import ShardModel

Batch = list[tuple[RequestState, Work]]


@dataclass(frozen=True)
class PassResult:
    outgoing: list[Outgoing]  # hidden states for the next stage
    sampled: list[SampledToken]  # the last stage's tokens, one per row of the batch (or none)
    accept_s: float = 0.0  # sampling work after the tokens were computed (for the trace)


@dataclass
class LaunchedPass:
    """A pass MLX is computing. `finish` waits for it; `drawn` holds a sampling pass's tokens
    (lazy until then); `fed_ahead` are the requests whose next step the stage queued on them."""

    batch: Batch
    finish: Callable[[], PassResult]
    drawn: DrawnRows | None = None
    fed_ahead: set[str] = field(default_factory=set[str])
    launched_at: float = 0.0  # perf_counter when building its graph began (for the trace)
    draw_s: float = 0.0  # building the sampling graph (for the trace)

    def next_input(self, row: int) -> mx.array:
        """Row `row`'s sampled token as the (1, 1) input of its request's next step, uncomputed."""
        assert self.drawn is not None
        return self.drawn.tokens[row : row + 1].reshape(1, 1)


def launch_pass(shard: ShardModel, batch: Batch, counters: StageCounters) -> LaunchedPass:
    if len(batch) > 1 and not batch[0][1].batchable:
        return _launch_chunks(shard, batch, counters)
    return _launch_steps(shard, batch, counters)


def _evaluated(arrays: list[mx.array]) -> PassResult:
    mx.eval(arrays)
    return PassResult([], [])


def _launch_steps(shard: ShardModel, batch: Batch, counters: StageCounters) -> LaunchedPass:
    """One request's pass, or several requests' single-token steps."""
    if len(batch) == 1:
        state, work = batch[0]
        output = shard.forward(work.inputs, state.cache)
    else:
        inputs = mx.concatenate([work.inputs for _, work in batch], axis=0)
        output = forward_rows(shard, inputs, [state.cache for state, _ in batch])
        counters.batched_steps += 1
        counters.batched_rows += len(batch)
    sample = batch[0][1].sample
    if not shard.spec.is_last:
        rows = [(state.next_address or "", state.request_id, work.step) for state, work in batch]
        mx.async_eval(output)
        return LaunchedPass(batch, lambda: PassResult(activation_frames(rows, output, sample), []))
    if not sample:  # a prompt chunk before the last: only the cache matters
        states = [layer_cache.state for layer_cache in batch[0][0].cache]
        mx.async_eval(states)
        return LaunchedPass(batch, lambda: _evaluated(states))
    logits = [output[row : row + 1] for row in range(len(batch))] if len(batch) > 1 else [output]
    samplers = cast("list[TokenSampler]", [state.sampler for state, _ in batch])
    assert all(sampler is not None for sampler in samplers)
    drawing = time.perf_counter()
    drawn = draw_rows(samplers, logits)
    mx.async_eval(drawn.tokens)
    draw_s = time.perf_counter() - drawing

    def finish() -> PassResult:
        mx.eval(drawn.tokens)  # the pass and the draw computed; what follows is sampling work
        accepting = time.perf_counter()
        sampled = accept_rows(samplers, drawn)
        return PassResult([], sampled, time.perf_counter() - accepting)

    return LaunchedPass(batch, finish, drawn, draw_s=draw_s)


def _launch_chunks(shard: ShardModel, batch: Batch, counters: StageCounters) -> LaunchedPass:
    """Several requests' prompt chunks (none sampled) in one padded pass."""
    outputs = forward_chunks(shard, [work.inputs for _, work in batch], [state.cache for state, _ in batch])
    counters.batched_steps += 1
    counters.batched_rows += len(batch)
    counters.grouped_prompt_chunks += len(batch)
    if shard.spec.is_last:
        states = [layer_cache.state for state, _ in batch for layer_cache in state.cache]
        mx.async_eval(states)
        return LaunchedPass(batch, lambda: _evaluated(states))
    mx.async_eval(outputs)

    def finish() -> PassResult:
        outgoing = [
            item
            for (state, work), output in zip(batch, outputs, strict=True)
            for item in activation_frames(
                [(state.next_address or "", state.request_id, work.step)], mx.contiguous(output), False
            )
        ]
        return PassResult(outgoing, [])

    return LaunchedPass(batch, finish)
