"""An event store held in memory: for tests and for nodes run without a data directory."""

from __future__ import annotations

from collections.abc import Sequence

from exo.core.events import IndexedEvent
from exo.store import rules
from exo.store.base import Snapshot, StoreError


class InMemoryEventStore:
    def __init__(self) -> None:
        self._is_open = False
        # One contiguous run: self._events[i].index == self._first_event_index + i.
        self._events: list[IndexedEvent] = []
        self._first_event_index = 1
        self._snapshots: dict[int, Snapshot] = {}
        self._commit_index: int | None = None

    async def open(self) -> None:
        self._is_open = True

    async def close(self) -> None:
        self._is_open = False

    async def append(self, events: Sequence[IndexedEvent]) -> None:
        self._check_open()
        rules.check_batch_continues(events, self._last_index())
        if not self._events and events:
            self._first_event_index = events[0].index
        self._events.extend(events)

    async def append_now(self, events: Sequence[IndexedEvent]) -> None:
        await self.append(events)  # never leaves the caller's thread anyway

    async def read(self, start: int, end: int | None = None, limit: int | None = None) -> list[IndexedEvent]:
        self._check_open()
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        begin = max(start - self._first_event_index, 0)
        stop = (
            len(self._events)
            if end is None
            else max(min(end - self._first_event_index, len(self._events)), 0)
        )
        if limit is not None:
            stop = min(stop, begin + limit)
        return self._events[begin:stop]

    async def last_index(self) -> int:
        self._check_open()
        return self._last_index()

    async def first_index(self) -> int:
        self._check_open()
        return rules.first_index(
            self._events[0].index if self._events else None, max(self._snapshots, default=None)
        )

    async def truncate_after(self, index: int) -> None:
        self._check_open()
        rules.check_truncate_index(index)
        del self._events[max(index + 1 - self._first_event_index, 0) :]
        self._snapshots = {at: snapshot for at, snapshot in self._snapshots.items() if at <= index}

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self._check_open()
        rules.check_snapshot(snapshot)
        last_event_index = self._events[-1].index if self._events else None
        if rules.snapshot_supersedes_events(snapshot.index, last_event_index):
            self._events.clear()
        self._snapshots[snapshot.index] = Snapshot(snapshot.index, snapshot.state)

    async def load_snapshot(self, at_or_before: int | None = None) -> Snapshot | None:
        self._check_open()
        candidates = [at for at in self._snapshots if at_or_before is None or at <= at_or_before]
        return self._snapshots[max(candidates)] if candidates else None

    async def save_commit_index(self, index: int) -> None:
        self._check_open()
        self._commit_index = index

    async def load_commit_index(self) -> int | None:
        self._check_open()
        return self._commit_index

    def _last_index(self) -> int:
        last_event_index = self._events[-1].index if self._events else 0
        return max(last_event_index, max(self._snapshots, default=0))

    def _check_open(self) -> None:
        if not self._is_open:
            raise StoreError("the event store is not open: call open() first")
