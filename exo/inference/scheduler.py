"""What a stage runs next, and which requests the first stage lets in: sans-IO decisions.

`StageScheduler` keeps each request's work in order (prefill chunks, then one step at a time) and
chooses the next forward pass: either one request's prefill chunk, or the single-token steps of
several requests run as one batch (continuous batching). When both kinds wait it alternates, so a
new request's prefill holds running decodes up for at most one chunk at a time, and a stream of
decodes never starves a prefill.

`AdmissionQueue` bounds the requests an instance serves at once: past `max_active` they wait in
arrival order, past `max_waiting` they are refused (the requester answers 503 with a retry hint).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar


@dataclass(frozen=True)
class Work:
    """One forward pass of one request: a prefill chunk or a decode step."""

    request_id: str
    step: int  # index of the token this pass leads to
    inputs: Any  # token ids (1, L) on the first stage, hidden states (1, L, H) elsewhere
    sample: bool  # False for prompt chunks before the last one
    batchable: bool = False  # a single sampled token: may run in one pass with other requests' steps
    tokens: int = 1  # positions this pass adds to the request's cache
    queued_at: float = field(default_factory=time.perf_counter, compare=False)  # input here (traces)

    @property
    def groupable(self) -> bool:
        """A prompt chunk that may share a pass with other requests' chunks (padded to the
        longest): it samples nothing, so only its cache and outputs matter."""
        return not self.batchable and not self.sample


@dataclass(frozen=True)
class _Queued:
    arrival: int
    work: Work


class StageScheduler:
    def __init__(self) -> None:
        # request id -> its pending work in order; a request's head is the only one runnable.
        self._pending: dict[str, deque[_Queued]] = {}
        self._arrivals = itertools.count()
        self._size = 0
        self._last_kind: Literal["prefill", "batch"] = "batch"

    def __len__(self) -> int:
        return self._size

    def submit(self, work: Work) -> None:
        self._pending.setdefault(work.request_id, deque()).append(_Queued(next(self._arrivals), work))
        self._size += 1

    def _heads(self) -> list[_Queued]:
        return sorted((queue[0] for queue in self._pending.values()), key=lambda queued: queued.arrival)

    def _pop(self, request_id: str) -> Work:
        queue = self._pending[request_id]
        work = queue.popleft().work
        if not queue:
            del self._pending[request_id]
        self._size -= 1
        return work

    def next(self) -> Work | None:
        """The oldest runnable work alone (arrival order, one request's pass per turn)."""
        heads = self._heads()
        return self._pop(heads[0].work.request_id) if heads else None

    def next_batch(self, limit: int, prefill_tokens: int = 0) -> list[Work]:
        """The next forward pass: prefill chunks (the oldest, with other requests' chunks that fit
        `prefill_tokens` padded positions: see `group_prefills`), or up to `limit` requests'
        batchable steps (oldest first, one per request). Empty when nothing waits."""
        heads = self._heads()
        batchable = [queued.work for queued in heads if queued.work.batchable]
        prefills = [queued.work for queued in heads if not queued.work.batchable]
        if prefills and (not batchable or self._last_kind == "batch"):
            self._last_kind = "prefill"
            group = group_prefills(prefills, limit, prefill_tokens)
            return [self._pop(work.request_id) for work in group]
        self._last_kind = "batch"
        return [self._pop(work.request_id) for work in batchable[: max(1, limit)]]

    def drop_request(self, request_id: str) -> int:
        """Forget a request's queued work (cancelled, finished or failed); returns how many."""
        queue = self._pending.pop(request_id, None)
        dropped = len(queue) if queue is not None else 0
        self._size -= dropped
        return dropped


def group_prefills(prefills: list[Work], limit: int, padded_tokens: int) -> list[Work]:
    """The oldest prompt chunk, and the next oldest groupable chunks to run with it, padded to the
    longest: at most `limit` chunks and `padded_tokens` padded positions, with at least three
    quarters of those positions real (padding is computed and thrown away). One chunk when the
    first is not groupable."""
    first = prefills[0]
    group = [first]
    if not first.groupable:
        return group
    longest, real = first.tokens, first.tokens
    for work in prefills[1:]:
        if len(group) >= limit:
            break
        if not work.groupable:
            continue
        grown = max(longest, work.tokens)
        padded = grown * (len(group) + 1)
        if padded > padded_tokens or 4 * (real + work.tokens) < 3 * padded:
            continue
        group.append(work)
        longest, real = grown, real + work.tokens
    return group


def micro_batch_limit(max_batch_size: int, active_requests: int, pipeline_depth: int) -> int:
    """How many requests' steps the first stage puts in one pass.

    With several stages, the active requests are split into `pipeline_depth` micro-batches so
    each stage works on one while the others work on the rest, instead of one batch walking the
    pipeline while every other stage idles.
    """
    if pipeline_depth <= 1:
        return max_batch_size
    return max(1, min(max_batch_size, math.ceil(active_requests / pipeline_depth)))


Item = TypeVar("Item")
Admission = Literal["admitted", "waiting", "refused"]


class AdmissionQueue(Generic[Item]):
    """Requests in service and waiting, by id. The caller says when one ends; `admit_waiting`
    then hands over the ones that may start now, oldest first."""

    def __init__(self, max_active: int, max_waiting: int) -> None:
        if max_active < 1 or max_waiting < 0:
            raise ValueError("max_active must be >= 1 and max_waiting >= 0")
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.active: set[str] = set()
        self.waiting: OrderedDict[str, Item] = OrderedDict()
        self.refused = 0

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.active or request_id in self.waiting

    def offer(self, request_id: str, item: Item) -> Admission:
        if request_id in self:
            raise ValueError(f"request {request_id!r} is already admitted or waiting")
        if len(self.active) < self.max_active and not self.waiting:
            self.active.add(request_id)
            return "admitted"
        if len(self.waiting) < self.max_waiting:
            self.waiting[request_id] = item
            return "waiting"
        self.refused += 1
        return "refused"

    def end(self, request_id: str) -> bool:
        """A request left (finished, cancelled, failed); True if it was active or waiting."""
        if request_id in self.active:
            self.active.discard(request_id)
            return True
        return self.waiting.pop(request_id, None) is not None

    def admit_waiting(self) -> list[Item]:
        admitted: list[Item] = []
        while self.waiting and len(self.active) < self.max_active:
            request_id, item = self.waiting.popitem(last=False)
            self.active.add(request_id)
            admitted.append(item)
        return admitted
