"""Where a generation's time went on one stage: what a stage reports to the requester at the end.

Every figure is a duration measured on the stage's own clock (never a timestamp compared across
machines), so clocks that differ between nodes cannot distort it. Offsets (`start_ms`) count from
the stage's receipt of the request's `GenerationStarted`. Bounded: the first `MAX_TRACED_STEPS`
sampled steps in full, every step in the summaries.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

MAX_TRACED_STEPS: Final = 16
MAX_STAGES: Final = 256  # a report's bound on a route's length (a requester keeps one per stage)

NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]


class DurationSummary(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Durations of one kind over a request's steps (percentiles from log-spaced buckets, within
    about 10 %)."""

    count: Annotated[int, msgspec.Meta(ge=0)] = 0
    total_ms: NonNegative = 0.0
    max_ms: NonNegative = 0.0
    p50_ms: NonNegative = 0.0
    p95_ms: NonNegative = 0.0

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.count if self.count else 0.0


class StepTiming(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """One sampled step on one stage. `wait_ms`: from the step's input arriving (or being fed) to
    its pass starting; `pass_ms`: the forward pass (for a batch, the whole pass); `sample_ms`: the
    last stage's sampling work; `rtt_ms`: the first stage of several, from sending the step's
    hidden state to receiving its token back (every other stage's work and every hop within);
    `held_ms`: from the step's input arriving to its output being ready (what this stage adds to
    the first stage's round trip)."""

    step: Annotated[int, msgspec.Meta(ge=0)]
    start_ms: NonNegative
    wait_ms: NonNegative
    pass_ms: NonNegative
    sample_ms: NonNegative = 0.0
    rtt_ms: NonNegative = 0.0
    held_ms: NonNegative = 0.0


class StageTimings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One stage's timings of one request, sent to the requester when the request ends there."""

    stage_index: Annotated[int, msgspec.Meta(ge=0, lt=MAX_STAGES)]
    stages: Annotated[int, msgspec.Meta(ge=1, le=MAX_STAGES)]  # the route's length
    stage_address: str = ""  # the stage's activation address (which runner, so which node)
    admission_ms: NonNegative = 0.0  # first stage: waiting for a place among the active requests
    prefill_start_ms: NonNegative = 0.0  # the first prompt pass's start (offset)
    prefill_wait_ms: NonNegative = 0.0  # prompt chunks waiting for their passes, summed
    prefill_ms: NonNegative = 0.0  # prompt chunks that sample nothing, their passes summed
    prefill_chunks: Annotated[int, msgspec.Meta(ge=0)] = 0
    first_out_ms: NonNegative = 0.0  # from receipt to step 0's output (hidden state or token) ready
    steps: Annotated[list[StepTiming], msgspec.Meta(max_length=MAX_TRACED_STEPS)] = []
    wait: DurationSummary = DurationSummary()
    passes: DurationSummary = DurationSummary()
    sampling: DurationSummary = DurationSummary()
    rtt: DurationSummary = DurationSummary()
    held_total_ms: NonNegative = 0.0  # `held_ms` summed over every sampled step
