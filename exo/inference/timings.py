"""A stage's per-request timing recorder: fixed size from the request's start, whatever its length.

The stage calls it once per pass row (and the first stage once per token returned); at the end it
becomes the `StageTimings` sent to the requester (exo/core/timings.py). Per step: a few float
additions and, for the first `MAX_TRACED_STEPS` steps, one small record; summaries keep counts,
totals, maxima and log-spaced buckets for percentiles, allocated once per request.
"""

from __future__ import annotations

import math
import time
from typing import Final

import msgspec

from exo.core.timings import MAX_TRACED_STEPS, DurationSummary, StageTimings, StepTiming

_LOWEST_S: Final = 1e-5  # bucket 0 holds everything under 10 us
_RATIO: Final = 1.2  # each bucket 20 % wider than the last: a percentile is within ~10 %
_BUCKETS: Final = 96  # up to ~400 s
_LOG_RATIO: Final = math.log(_RATIO)


class Durations:
    """Count, total, maximum and a log-spaced histogram of durations in seconds."""

    __slots__ = ("buckets", "count", "maximum", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.maximum = 0.0
        self.buckets = [0] * _BUCKETS

    def add(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.count += 1
        self.total += seconds
        self.maximum = max(self.maximum, seconds)
        index = 0 if seconds <= _LOWEST_S else 1 + int(math.log(seconds / _LOWEST_S) / _LOG_RATIO)
        self.buckets[min(index, _BUCKETS - 1)] += 1

    def quantile(self, fraction: float) -> float:
        """The bucket holding the `fraction` quantile, as its geometric middle (capped at the max)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index, count in enumerate(self.buckets):
            seen += count
            if seen >= rank:
                middle = _LOWEST_S * _RATIO ** (index - 0.5) if index else _LOWEST_S / 2
                return min(middle, self.maximum)
        return self.maximum

    def summary(self) -> DurationSummary:
        return DurationSummary(
            count=self.count,
            total_ms=_ms(self.total),
            max_ms=_ms(self.maximum),
            p50_ms=_ms(self.quantile(0.5)),
            p95_ms=_ms(self.quantile(0.95)),
        )


class RequestTimings:
    """One request on one stage. Times are `time.perf_counter()` seconds."""

    __slots__ = (
        "admission",
        "first_out",
        "held",
        "passes",
        "prefill_chunks",
        "prefill_pass",
        "prefill_start",
        "prefill_wait",
        "ready_at",
        "received_at",
        "rtt",
        "sampling",
        "sent_at",
        "sent_step",
        "steps",
        "wait",
    )

    def __init__(self, received_at: float | None = None, admitted_at: float | None = None) -> None:
        self.received_at = received_at if received_at is not None else time.perf_counter()
        self.admission = 0.0 if admitted_at is None else max(0.0, admitted_at - self.received_at)
        self.prefill_start: float | None = None
        self.prefill_wait = 0.0
        self.prefill_pass = 0.0
        self.prefill_chunks = 0
        self.first_out: float | None = None
        self.steps: list[StepTiming] = []
        self.wait = Durations()
        self.passes = Durations()
        self.sampling = Durations()
        self.rtt = Durations()
        self.held = 0.0
        self.sent_at = 0.0  # the first stage of several: when the last sampled step went on
        self.sent_step = -1
        self.ready_at = 0.0  # the request's last pass here

    def passed(
        self, step: int, sampled: bool, *, queued_at: float, started: float, ready: float, sample_s: float
    ) -> None:
        """A pass of this request ran from `started` until its output was `ready` (sampling done).
        Its wait counts from its input's arrival, or from the request's previous pass here when
        the input was queued ahead of that pass's result."""
        wait = max(0.0, started - max(queued_at, self.ready_at))
        self.ready_at = ready
        pass_s = max(0.0, ready - started - sample_s)
        if self.prefill_start is None:
            self.prefill_start = started
        if not sampled:
            self.prefill_wait += wait
            self.prefill_pass += pass_s
            self.prefill_chunks += 1
            return
        if self.first_out is None:
            self.first_out = ready
        held = max(0.0, ready - queued_at)
        self.held += held
        self.wait.add(wait)
        self.passes.add(pass_s)
        if sample_s:
            self.sampling.add(sample_s)
        if len(self.steps) < MAX_TRACED_STEPS:
            start_ms = _ms(started - self.received_at)
            record = StepTiming(step, start_ms, _ms(wait), _ms(pass_s), _ms(sample_s), 0.0, _ms(held))
            self.steps.append(record)

    def sent(self, step: int, at: float) -> None:
        self.sent_at, self.sent_step = at, step

    def returned(self, step: int, at: float) -> None:
        """The first stage of several got step `step`'s token back."""
        if step != self.sent_step:
            return
        rtt = max(0.0, at - self.sent_at)
        self.rtt.add(rtt)
        self.sent_step = -1
        for position in range(len(self.steps) - 1, -1, -1):
            record = self.steps[position]
            if record.step == step:
                self.steps[position] = msgspec.structs.replace(record, rtt_ms=_ms(rtt))
                break

    def report(self, stage_index: int, stages: int, address: str = "") -> StageTimings:
        origin = self.received_at
        return StageTimings(
            stage_index=stage_index,
            stages=stages,
            stage_address=address,
            admission_ms=_ms(self.admission),
            prefill_start_ms=_ms(self.prefill_start - origin) if self.prefill_start is not None else 0.0,
            prefill_wait_ms=_ms(self.prefill_wait),
            prefill_ms=_ms(self.prefill_pass),
            prefill_chunks=self.prefill_chunks,
            first_out_ms=_ms(self.first_out - origin) if self.first_out is not None else 0.0,
            steps=list(self.steps),
            wait=self.wait.summary(),
            passes=self.passes.summary(),
            sampling=self.sampling.summary(),
            rtt=self.rtt.summary(),
            held_total_ms=_ms(self.held),
        )


def _ms(seconds: float) -> float:
    return round(max(0.0, seconds) * 1000, 3)
