"""The node's committed state: entries folded strictly in index order once Raft says a majority
holds them (exo/node/raft_member.py calls `apply`).

Every node (master included) applies through here, so `GET /state`, `GET /events` and `exo-replay`
of the node's own events.db agree: all three stop at the commit index. The store may hold more (an
uncommitted tail the master may still replace); `read` never serves it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from exo.core.events import IndexedEvent
from exo.core.fold import LogFold, LogGapError
from exo.core.state import State, StateBuilder
from exo.roles.sequencer import OriginHighWater
from exo.store.base import EventStore
from exo.store.restore import RESTORE_PAGE_EVENTS


@dataclass(frozen=True)
class StoredLog:
    """What a restart found in the store for Raft: the entries after `base_index` (committed or
    not), the term and voters at the base (a snapshot's, or 0 and none)."""

    entries: list[IndexedEvent]
    base_index: int = 0
    base_term: int = 0
    base_voters: frozenset[str] = frozenset()


class Replica:
    def __init__(
        self,
        store: EventStore,
        state: State,
        high_water: OriginHighWater | None = None,
        log: StoredLog | None = None,
    ) -> None:
        self.store = store
        self.state = state
        self.high_water = high_water if high_water is not None else OriginHighWater()
        self.log = log if log is not None else StoredLog([])
        self._changed = asyncio.Condition()
        # Called with each batch right after it is applied (benchmarks, the node's own bookkeeping).
        self.applied_listeners: list[Callable[[Sequence[IndexedEvent]], None]] = []

    @property
    def last_index(self) -> int:
        """The commit index this node applied."""
        return self.state.last_event_index

    async def apply(self, entries: Sequence[IndexedEvent]) -> None:
        """Fold committed entries (the caller stored them first); ones already applied are skipped."""
        fresh = [entry for entry in entries if entry.index > self.last_index]
        if not fresh:
            return
        assert fresh[0].index == self.last_index + 1, "committed entries are applied without a gap"
        builder = StateBuilder(self.state)
        for entry in fresh:
            builder.apply(entry)
            self.high_water.observe(entry)
        self.state = builder.build()
        for listener in self.applied_listeners:
            listener(fresh)
        async with self._changed:
            self._changed.notify_all()

    async def install(self, state: State) -> None:
        """A master's snapshot, already durable in the store, replaces the state it is ahead of
        (Raft's snapshot install): the entries it covers are never applied one by one here."""
        if state.last_event_index <= self.last_index:
            return
        self.state = state
        async with self._changed:
            self._changed.notify_all()

    async def read(self, start: int, end: int | None = None, limit: int | None = None) -> list[IndexedEvent]:
        """The committed log, like `EventStore.read` but never past what this node applied."""
        stop = self.last_index + 1 if end is None else min(end, self.last_index + 1)
        if start >= stop:
            return []
        return await self.store.read(start, stop, limit)

    async def wait_for(self, predicate: object, timeout: float) -> bool:
        """Wait until `predicate(state)` holds; False on timeout."""
        assert callable(predicate)

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: bool(predicate(self.state)))
        except TimeoutError:
            return False
        return True


async def restore(store: EventStore) -> Replica:
    """The node's committed state from its own log (newest snapshot, then every event up to the
    recorded commit index, or to the end for a log from before quorum commits), the origins' high
    water from the same pass, and every stored entry after the snapshot for Raft. LogGapError
    when the log has a hole."""
    committed = await store.load_commit_index()
    # Every snapshot is committed state (a compaction's or a master's), even one newer than the
    # recorded commit index (a crash between saving it and recording the index).
    snapshot = await store.load_snapshot()
    if snapshot is not None and committed is not None:
        committed = max(committed, snapshot.index)
    base = snapshot.index if snapshot is not None else 0
    base_state = snapshot.state if snapshot is not None else State()
    fold = LogFold(base_state)
    high_water = OriginHighWater()
    entries: list[IndexedEvent] = []
    while True:
        page = await store.read(base + len(entries) + 1, limit=RESTORE_PAGE_EVENTS)
        if not page:
            break
        if page[0].index != base + len(entries) + 1:
            break  # a hole: the fold below names it
        entries.extend(page)
        ready = page if committed is None else [entry for entry in page if entry.index <= committed]
        fold.feed(ready)
        for entry in ready:
            high_water.observe(entry)
    if base + len(entries) < await store.last_index():
        later = await store.read(base + len(entries) + 1, limit=1)
        raise LogGapError(base + len(entries) + 1, later[0].index if later else None)
    state = fold.state()
    voters = frozenset(base_state.nodes)
    log = StoredLog(entries, base, base_state.term, voters)
    return Replica(store, state, high_water, log)
