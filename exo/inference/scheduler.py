"""What a stage runs next: a sans-IO queue of work items.

Today one request's step per turn, in arrival order. Continuous batching will replace `next()` with
a choice of several requests' decode steps to run as one batch; the stage asks the scheduler and
nothing else needs to change.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Work:
    """One forward pass of one request: a prefill chunk or a decode step."""

    request_id: str
    step: int  # index of the token this pass leads to
    inputs: Any  # token ids (1, L) on the first stage, hidden states (1, L, H) elsewhere
    sample: bool  # False for prompt chunks before the last one


class StageScheduler:
    def __init__(self) -> None:
        self._queue: deque[Work] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, work: Work) -> None:
        self._queue.append(work)

    def next(self) -> Work | None:
        return self._queue.popleft() if self._queue else None

    def drop_request(self, request_id: str) -> int:
        """Forget a request's queued work (cancelled, finished or failed); returns how many."""
        kept = deque(work for work in self._queue if work.request_id != request_id)
        dropped = len(self._queue) - len(kept)
        self._queue = kept
        return dropped
