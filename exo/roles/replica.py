"""The node's copy of the log and state: durable first, then applied, strictly in index order.

Every node (master included) applies through here, so `GET /state` and `exo-replay` of the node's
own events.db always agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import msgspec

from exo.events import IndexedEvent
from exo.roles.sequencer import EventOrderer, OriginHighWater
from exo.state import State, apply
from exo.store.base import EventStore, Snapshot


class Replica:
    def __init__(self, store: EventStore, state: State) -> None:
        self.store = store
        self.state = state
        self.orderer = EventOrderer(state.last_event_index)
        self.high_water = OriginHighWater()
        self._changed = asyncio.Condition()
        self._write_lock = asyncio.Lock()
        # Called with each batch right after it is applied (benchmarks, the node's own bookkeeping).
        self.applied_listeners: list[Callable[[Sequence[IndexedEvent]], None]] = []

    @property
    def last_index(self) -> int:
        return self.state.last_event_index

    async def commit(self, events: Sequence[IndexedEvent]) -> None:
        """Store then apply events that continue the log exactly (the master's own sequencing)."""
        if not events:
            return
        async with self._write_lock:
            await self.store.append(events)
            self._fold(events)
            self.orderer.reset(self.state.last_event_index)
        await self._notify()

    async def receive(self, events: Sequence[IndexedEvent]) -> int:
        """Events from the master in any order: release what is contiguous. Returns how many applied."""
        async with self._write_lock:
            ready = self.orderer.receive(events)
            if not ready:
                return 0
            try:
                await self.store.append(ready)
            except BaseException:
                # Not durable, so not applied: forget them and fetch again.
                self.orderer.reset(self.state.last_event_index)
                raise
            self._fold(ready)
        await self._notify()
        return len(ready)

    async def install_snapshot(self, index: int, state: State) -> None:
        async with self._write_lock:
            await self.store.save_snapshot(Snapshot(index, state))
            self.state = state
            self.orderer.reset(index)
        await self._notify()

    async def truncate_after(self, index: int, state: State) -> None:
        """Drop a divergent tail and continue from `state` (rebuilt at `index`)."""
        async with self._write_lock:
            await self.store.truncate_after(index)
            self.state = state
            self.orderer.reset(index)
        await self._notify()

    def _fold(self, events: Sequence[IndexedEvent]) -> None:
        state = self.state
        high_water = self.high_water
        for event in events:
            state = apply(state, event)
            high_water.observe(event)
        self.state = state
        for listener in self.applied_listeners:
            listener(events)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: object, timeout: float) -> bool:
        """Wait until `predicate(state)` holds; False on timeout."""
        assert callable(predicate)

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: bool(predicate(self.state)))
        except TimeoutError:
            return False
        return True


RESTORE_CHUNK = 50_000


async def restore(store: EventStore) -> Replica:
    """Rebuild the node's state from its own log: newest snapshot, then every event after it."""
    replica = Replica(store, await rebuild(store))
    replica.orderer.reset(replica.last_index)
    async for events in _chunks(store, replica.last_index + 1, None):
        for event in events:
            replica.high_water.observe(event)
    return replica


async def rebuild(store: EventStore, until: int | None = None) -> State:
    """The state at index `until` (the end when None): newest snapshot at or before it, then events."""
    snapshot = await store.load_snapshot(until)
    state = snapshot.state if snapshot is not None else State()
    async for events in _chunks(store, state.last_event_index + 1, until):
        for event in events:
            state = apply(state, event)
    return state


async def _chunks(store: EventStore, start: int, until: int | None) -> AsyncIterator[list[IndexedEvent]]:
    while True:
        end = None if until is None else until + 1
        events = await store.read(start, end, limit=RESTORE_CHUNK)
        if not events:
            return
        yield events
        start = events[-1].index + 1


async def find_common_prefix(
    replica: Replica, event_at: Callable[[int], Awaitable[IndexedEvent | None]]
) -> int | None:
    """The highest index up to which this log equals another's (`event_at` reads the other log).

    Gallops back from the end, then bisects: a few round trips even for a long divergent tail.
    None when there is nothing to compare.
    """
    last = replica.last_index
    if last == 0:
        return None

    async def same(index: int) -> bool:
        if index == 0:
            return True
        ours = await replica.store.read(index, index + 1, limit=1)
        theirs = await event_at(index)
        return bool(ours) and theirs is not None and encode_indexed(ours[0]) == encode_indexed(theirs)

    if await same(last):
        return last
    bad, step = last, 1
    good = max(0, last - step)
    while not await same(good):
        bad, step = good, step * 2
        good = max(0, last - step)
    while bad - good > 1:
        middle = (good + bad) // 2
        if await same(middle):
            good = middle
        else:
            bad = middle
    return good


_indexed_encoder = msgspec.msgpack.Encoder()


def encode_indexed(event: IndexedEvent) -> bytes:
    return _indexed_encoder.encode(event)
