"""Per-request traces: where a generation's time went, kept for the last few hundred requests.

The API records what it sees of each completion (the prompt's preparation, the wait for the first
token, which is queueing plus prefill across the pipeline's stages and their network hops, then
decoding with its inter-token gaps); `GET /v1/traces/{request_id}` returns one and the dashboard
draws it. Bounded: an LRU of `MAX_TRACES` request ids, and each trace a fixed number of figures.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import msgspec

MAX_TRACES: Final = 512
MAX_GAPS: Final = 2048  # inter-token gaps kept per trace (the rest only count in the summary)


class TraceSpan(msgspec.Struct, frozen=True):
    """One stage of a request, in milliseconds from the request's arrival."""

    name: str
    start_ms: float
    duration_ms: float
    node_id: str | None = None
    detail: str = ""
    stage: int | None = None  # the pipeline stage (0 first) it happened on, or left from
    step: int | None = None  # the token it leads to (0: the prompt's last pass)


class StageTrace(msgspec.Struct, frozen=True, kw_only=True):
    """One stage's share of a request, as the stage reported it (durations on its own clock).
    Summaries hold total, mean, p50, p95 and max in ms over every sampled step."""

    stage_index: int
    node_id: str | None
    detail: str  # layers or tensor rank
    steps: int  # sampled steps (tokens) that ran here
    admission_ms: float  # the first stage: waiting for a place among the active requests
    prefill_ms: float  # prompt chunks before the last, their passes summed
    prefill_chunks: int
    wait_ms: dict[str, float]
    pass_ms: dict[str, float]
    sampling_ms: dict[str, float]  # the last stage
    # The hop from this stage to the next (the last stage's: its token back to the first), mean per
    # step: the first stage's round trip minus every other stage's time, split evenly over the
    # hops (one clock cannot tell the hops of one round trip apart). None with one stage.
    hop_ms: float | None = None


class Trace(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    model: str
    instance_id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None
    total_ms: float
    ttft_ms: float | None
    tokens_per_second: float | None
    inter_token_ms: dict[str, float]  # mean, p50, p95, max of the gaps between tokens
    spans: list[TraceSpan]
    finished: bool = True
    stages: list[StageTrace] = []  # when the stages reported (a pipeline's node, this release)
    # Requester to the first stage and the last stage's first token back, each (estimated: half of
    # the time to the first token that no stage accounts for, so it includes the API's own delays).
    requester_hop_ms: float | None = None


class TraceStore:
    """The last MAX_TRACES traces by request id (a completion's `id`)."""

    def __init__(self, capacity: int = MAX_TRACES) -> None:
        self.capacity = capacity
        self._traces: OrderedDict[str, Trace] = OrderedDict()

    def __len__(self) -> int:
        return len(self._traces)

    def add(self, trace: Trace) -> None:
        self._traces[trace.request_id] = trace
        self._traces.move_to_end(trace.request_id)
        while len(self._traces) > self.capacity:
            self._traces.popitem(last=False)

    def replace(self, trace: Trace) -> None:
        """A kept trace completed (its stages' spans merged in): same place in the LRU."""
        if trace.request_id in self._traces:
            self._traces[trace.request_id] = trace

    def get(self, request_id: str) -> Trace | None:
        return self._traces.get(request_id)

    def recent(self, limit: int = 20) -> list[str]:
        """The newest request ids first."""
        return list(reversed(self._traces))[:limit]


def gap_summary(gaps_s: list[float]) -> dict[str, float]:
    if not gaps_s:
        return {}
    ordered = sorted(gaps_s)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    return {
        "mean": round(sum(ordered) / len(ordered) * 1000, 3),
        "p50": round(at(0.5), 3),
        "p95": round(at(0.95), 3),
        "max": round(ordered[-1] * 1000, 3),
    }
