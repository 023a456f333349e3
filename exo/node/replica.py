"""The node's copy of the log and state, applied strictly in index order.

Every node (master included) applies through here, so `GET /state` and `exo-replay` of the node's
own events.db always agree once the node's writes land.

Two paths: `commit` (the master's own sequencing) makes events durable, then applies them. `receive`
(events from the master, whose copy is already durable) applies them as soon as they are
contiguous and writes them to this node's store in the background, grouping what arrives within
PERSIST_GROUP_SECONDS (or until PERSIST_GROUP_EVENTS wait) into one commit; under load a follower's
fsync was the larger half of the event path's latency, and its many small commits queued on the
disk ahead of the master's.
`durable_index` is what this node's store holds: the election ranks by it, and a restart restores
exactly that (the rest is fetched from the master again). Truncation, snapshots, log comparison and
`close` first write everything applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import msgspec

from exo.core.events import IndexedEvent
from exo.core.state import State, StateBuilder
from exo.roles.sequencer import EventOrderer, OriginHighWater
from exo.store.base import EventStore, Snapshot, StoreError
from exo.store.restore import restore_state

logger = logging.getLogger(__name__)

# Applied but not yet stored: past this, `receive` waits for the store (bounded memory, and a
# follower never runs far ahead of what it could restore).
MAX_UNPERSISTED_EVENTS = 50_000
PERSIST_RETRY_INITIAL = 0.05
PERSIST_RETRY_MAX = 1.0
# A follower groups its background writes: at most one commit per PERSIST_GROUP_SECONDS unless
# PERSIST_GROUP_EVENTS wait. Every node's fsync goes to the same disk, and a follower writing each
# small batch as it came queued its fsyncs ahead of the master's, which is on the event path.
PERSIST_GROUP_SECONDS = 0.01
PERSIST_GROUP_EVENTS = 1024


class Replica:
    def __init__(self, store: EventStore, state: State, high_water: OriginHighWater | None = None) -> None:
        self.store = store
        self.state = state
        self.orderer = EventOrderer(state.last_event_index)
        self.high_water = high_water if high_water is not None else OriginHighWater()
        self.durable_index = state.last_event_index
        self.persist_failures = 0
        self._changed = asyncio.Condition()
        # Lock order: _apply_lock, then _store_lock. The background writer takes only _store_lock,
        # so `receive` never waits for an fsync in progress.
        self._apply_lock = asyncio.Lock()
        self._store_lock = asyncio.Lock()
        self._unpersisted: list[IndexedEvent] = []
        self._persister: asyncio.Task[None] | None = None
        self._group_full = asyncio.Event()  # PERSIST_GROUP_EVENTS wait: write without waiting longer
        # Called with each batch right after it is applied (benchmarks, the node's own bookkeeping).
        self.applied_listeners: list[Callable[[Sequence[IndexedEvent]], None]] = []

    @property
    def last_index(self) -> int:
        return self.state.last_event_index

    @property
    def unpersisted(self) -> int:
        return len(self._unpersisted)

    async def commit(self, events: Sequence[IndexedEvent]) -> None:
        """Store then apply events that continue the log exactly (the master's own sequencing)."""
        if not events:
            return
        async with self._apply_lock:
            # Once the write is under way it may land whatever the caller does (it runs to its end on
            # the store's thread), so a cancelled caller (a master stepping down) still waits for it
            # and applies what landed: a store ahead of the applied state would make the next
            # sequencer reuse indices the log already holds.
            await _finish_even_if_cancelled(self._commit_locked(events))
        await self._notify()

    async def _commit_locked(self, events: Sequence[IndexedEvent]) -> None:
        async with self._store_lock:
            await self._persist(events, now=True)  # apply and publish wait for it anyway
        self._fold(events)
        self.orderer.reset(self.state.last_event_index)

    async def receive(self, events: Sequence[IndexedEvent]) -> int:
        """Events from the master in any order: apply what is contiguous. Returns how many applied."""
        async with self._apply_lock:
            if len(self._unpersisted) >= MAX_UNPERSISTED_EVENTS:
                await self.flush()
            ready = self.orderer.receive(events)
            if not ready:
                return 0
            self._fold(ready)
            self._unpersisted.extend(ready)
            if len(self._unpersisted) >= PERSIST_GROUP_EVENTS:
                self._group_full.set()
            if self._persister is None or self._persister.done():
                self._persister = asyncio.create_task(self._persist_in_background(), name="replica-persist")
        await self._notify()
        return len(ready)

    async def flush(self) -> None:
        """Make everything applied durable (StoreError or ValueError when the store refuses)."""
        async with self._store_lock:
            await self._persist()

    async def close(self) -> None:
        """Write what is applied but not yet stored, then stop the background writer."""
        try:
            await self.flush()
        finally:
            if self._persister is not None:
                self._persister.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._persister

    async def read(self, start: int, end: int | None = None, limit: int | None = None) -> list[IndexedEvent]:
        """The applied log (stored events, then those still being written), like `EventStore.read`."""
        # Taken before the store is read: whatever is not in it was durable by then, so the two meet.
        tail = list(self._unpersisted)
        events = await self.store.read(start, end, limit)
        after = events[-1].index if events else start - 1
        for event in tail:
            if limit is not None and len(events) >= limit:
                break
            if event.index > after and (end is None or event.index < end):
                events.append(event)
        return events

    async def install_snapshot(self, index: int, state: State) -> None:
        async with self._apply_lock:
            async with self._store_lock:
                await self._persist()
                await self.store.save_snapshot(Snapshot(index, state))
                self.durable_index = await self.store.last_index()
            self.state = state
            self.orderer.reset(index)
        await self._notify()

    async def truncate_after(self, index: int, state: State) -> None:
        """Drop a divergent tail and continue from `state` (rebuilt at `index`)."""
        async with self._apply_lock:
            async with self._store_lock:
                await self._persist()
                await self.store.truncate_after(index)
                self.durable_index = await self.store.last_index()
            self.state = state
            self.orderer.reset(index)
        await self._notify()

    async def _persist(self, extra: Sequence[IndexedEvent] = (), *, now: bool = False) -> None:
        """Write the applied-but-unstored events, then `extra`, in one commit (_store_lock held)."""
        if self._unpersisted:
            # A write whose caller was cancelled may have landed anyway: the store says what it holds.
            stored = await self.store.last_index()
            landed = 0
            while landed < len(self._unpersisted) and self._unpersisted[landed].index <= stored:
                landed += 1
            del self._unpersisted[:landed]
        batch = [*self._unpersisted, *extra]
        if not batch:
            return
        # `receive` may add events while this write runs: only the ones written leave the list.
        written = len(self._unpersisted)
        await (self.store.append_now(batch) if now else self.store.append(batch))
        del self._unpersisted[:written]
        self.durable_index = batch[-1].index

    async def _persist_in_background(self) -> None:
        delay = PERSIST_RETRY_INITIAL
        while self._unpersisted:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PERSIST_GROUP_SECONDS):
                    await self._group_full.wait()
            self._group_full.clear()
            try:
                await self.flush()
            except (StoreError, ValueError) as error:
                # Applied but not durable: keep them and retry; `receive` stops at the bound.
                self.persist_failures += 1
                logger.error(
                    "could not store %d applied events (retrying): %s", len(self._unpersisted), error
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, PERSIST_RETRY_MAX)
            else:
                delay = PERSIST_RETRY_INITIAL

    def _fold(self, events: Sequence[IndexedEvent]) -> None:
        builder = StateBuilder(self.state)
        high_water = self.high_water
        for event in events:
            builder.apply(event)
            high_water.observe(event)
        self.state = builder.build()
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


async def _finish_even_if_cancelled(step: Coroutine[Any, Any, None]) -> None:
    """Run `step` to its end; a cancellation of the caller is re-raised once it has finished."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        break
    if cancelled:
        raise asyncio.CancelledError


async def restore(store: EventStore) -> Replica:
    """The node's state from its own log (newest snapshot, then every event after it, refused with
    LogGapError when the log has a hole), and the origins' high water from the same pass."""
    high_water = OriginHighWater()

    def observe(events: Sequence[IndexedEvent]) -> None:
        for event in events:
            high_water.observe(event)

    return Replica(store, await restore_state(store, on_events=observe), high_water)


async def find_common_prefix(
    replica: Replica, event_at: Callable[[int], Awaitable[IndexedEvent | None]]
) -> int | None:
    """The highest index up to which this log equals another's (`event_at` reads the other log).

    Gallops back from the end, then bisects: a few round trips even for a long divergent tail.
    None when there is nothing to compare.
    """
    # Compare stored logs: what this node applied but has not written yet is written first.
    await replica.flush()
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
