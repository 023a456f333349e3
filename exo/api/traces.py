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
