"""The replica shell over an in-memory store: restore, divergent-tail detection, truncation, and
followers that apply first and write in the background."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from exo.core.events import IndexedEvent, MasterElected, NodeJoined, NodeLabelled
from exo.core.state import State, apply
from exo.node import replica as replica_module
from exo.node.replica import Replica, find_common_prefix, restore
from exo.store.base import StoreError
from exo.store.memory import InMemoryEventStore
from exo.store.restore import restore_state


def log(length: int, term: int = 1, origin: str = "m", start: int = 1) -> list[IndexedEvent]:
    events: list[IndexedEvent] = []
    for index in range(start, start + length):
        event = NodeJoined("n", "h:1") if index == 1 else NodeLabelled("n", "k", f"{origin}{index}")
        events.append(IndexedEvent(index, term, origin, index, event))
    return events


async def replica_with(events: list[IndexedEvent]) -> Replica:
    store = InMemoryEventStore()
    await store.open()
    replica = Replica(store, State())
    await replica.commit(events)
    return replica


async def test_restore_rebuilds_the_same_state() -> None:
    replica = await replica_with(log(50))
    restored = await restore(replica.store)
    assert restored.state == replica.state
    assert restored.orderer.last_applied == 50
    assert (await restore_state(replica.store, 10)).last_event_index == 10


async def common_prefix(ours: list[IndexedEvent], theirs: list[IndexedEvent]) -> int | None:
    replica = await replica_with(ours)
    by_index = {event.index: event for event in theirs}

    async def event_at(index: int) -> IndexedEvent | None:
        return by_index.get(index)

    return await find_common_prefix(replica, event_at)


async def test_common_prefix_of_equal_logs_is_the_whole_log() -> None:
    assert await common_prefix(log(30), log(30)) == 30


async def test_common_prefix_when_the_other_log_is_longer_or_shorter() -> None:
    assert await common_prefix(log(30), log(40)) == 30
    assert await common_prefix(log(30), log(17)) == 17


async def test_common_prefix_finds_where_a_partitioned_tail_begins() -> None:
    shared = log(23)
    ours = shared + [IndexedEvent(i, 2, "minority", i, MasterElected(2, "x")) for i in range(24, 90)]
    theirs = shared + log(10, term=3, origin="majority", start=24)
    assert await common_prefix(ours, theirs) == 23
    assert await common_prefix(ours, []) == 0


async def test_truncating_a_divergent_tail_rebuilds_state() -> None:
    replica = await replica_with(log(40))
    expected = await restore_state(replica.store, 25)
    await replica.truncate_after(25, expected)
    assert replica.last_index == 25
    assert await replica.store.last_index() == 25
    assert replica.state == expected
    await replica.commit(log(5, term=2, origin="new", start=26))
    assert replica.last_index == 30


# --- followers apply first and write in the background -------------------------------------------


class GatedStore(InMemoryEventStore):
    """An in-memory store whose appends wait at a gate, and can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.appends: list[list[int]] = []
        self.failing = False
        self.writing = asyncio.Event()  # set when an append begins
        # Set after every append, landed or failed.
        self.attempted = asyncio.Event()

    async def append(self, events: Sequence[IndexedEvent]) -> None:
        self.writing.set()
        await self.gate.wait()
        try:
            if self.failing:
                raise StoreError("disk full")
            await super().append(events)
            self.appends.append([event.index for event in events])
        finally:
            self.attempted.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not condition():
                self.attempted.clear()
                await self.attempted.wait()


async def gated_replica() -> tuple[Replica, GatedStore]:
    store = GatedStore()
    await store.open()
    return Replica(store, State()), store


async def wait_durable(replica: Replica, index: int) -> None:
    assert isinstance(replica.store, GatedStore)
    await replica.store.wait_until(lambda: replica.durable_index >= index)


async def test_received_events_apply_before_the_store_write_lands() -> None:
    replica, store = await gated_replica()
    store.gate.clear()
    assert await replica.receive(log(5)) == 5
    assert replica.last_index == 5
    assert replica.durable_index == 0
    assert await store.last_index() == 0
    assert replica.unpersisted == 5
    store.gate.set()
    await wait_durable(replica, 5)
    assert await store.read(1) == log(5)
    assert replica.unpersisted == 0


async def test_events_received_while_a_write_runs_go_in_the_next_write() -> None:
    replica, store = await gated_replica()
    store.gate.clear()
    events = log(30)
    await replica.receive(events[:10])
    async with asyncio.timeout(5):
        await store.writing.wait()  # the background write started and waits at the gate
    await replica.receive(events[10:20])
    await replica.receive(events[20:])
    store.gate.set()
    await wait_durable(replica, 30)
    assert store.appends == [list(range(1, 11)), list(range(11, 31))]


async def test_a_follower_groups_its_writes_until_enough_events_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_module, "PERSIST_GROUP_SECONDS", 60.0)
    monkeypatch.setattr(replica_module, "PERSIST_GROUP_EVENTS", 20)
    replica, store = await gated_replica()
    events = log(25)
    await replica.receive(events[:10])
    for _ in range(20):
        await asyncio.sleep(0)
    assert not store.writing.is_set()  # fewer than 20 wait: the write waits for more
    await replica.receive(events[10:])
    await wait_durable(replica, 25)
    assert store.appends == [list(range(1, 26))]  # one commit, not one per batch received


async def test_a_restart_restores_only_what_was_stored() -> None:
    replica, store = await gated_replica()
    await replica.receive(log(10))
    await wait_durable(replica, 10)
    store.gate.clear()
    await replica.receive(log(5, start=11))
    assert replica.last_index == 15
    # The process dies here: its store holds 10 events, and so does the node that restarts from it.
    restored = await restore(store)
    assert restored.last_index == restored.durable_index == 10
    store.gate.set()


async def test_a_failing_store_keeps_applied_events_and_retries_until_they_land() -> None:
    replica, store = await gated_replica()
    store.failing = True
    await replica.receive(log(8))
    assert replica.last_index == 8
    await store.wait_until(lambda: replica.persist_failures >= 2)
    assert replica.durable_index == 0
    store.failing = False
    await wait_durable(replica, 8)
    assert await store.read(1) == log(8)


async def test_receive_waits_for_the_store_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_module, "MAX_UNPERSISTED_EVENTS", 10)
    replica, store = await gated_replica()
    store.gate.clear()
    await replica.receive(log(10))
    blocked = asyncio.create_task(replica.receive(log(5, start=11)))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    assert replica.last_index == 10
    store.gate.set()
    assert await asyncio.wait_for(blocked, 5) == 5
    assert replica.last_index == 15


async def test_the_masters_commit_writes_the_unstored_tail_first() -> None:
    replica, store = await gated_replica()
    store.gate.clear()
    await replica.receive(log(4))
    store.gate.set()
    await replica.commit(log(3, term=2, origin="new", start=5))
    assert replica.durable_index == replica.last_index == 7
    # The tail lands before the batch (in the same commit or the one before it), never after.
    assert [index for batch in store.appends for index in batch] == list(range(1, 8))
    assert [event.index for event in await store.read(1)] == list(range(1, 8))


async def test_close_truncation_and_log_comparison_write_everything_applied_first() -> None:
    replica, store = await gated_replica()
    store.gate.clear()
    await replica.receive(log(20))
    store.gate.set()
    assert await find_common_prefix(replica, lambda index: _event_of(log(20), index)) == 20
    assert replica.durable_index == 20
    store.gate.clear()
    await replica.receive(log(5, start=21))
    store.gate.set()
    at_22 = await _state_at(log(25), 22)
    await replica.truncate_after(22, at_22)
    assert replica.state == at_22
    assert await store.last_index() == 22 == replica.durable_index
    store.gate.clear()
    await replica.receive(log(3, start=23))
    store.gate.set()
    await replica.close()
    assert await store.last_index() == 25


async def test_read_serves_the_applied_log_including_events_still_being_written() -> None:
    replica, store = await gated_replica()
    await replica.receive(log(6))
    await wait_durable(replica, 6)
    store.gate.clear()
    await replica.receive(log(4, start=7))
    assert await store.read(1) == log(6)
    assert await replica.read(1) == log(10)
    assert await replica.read(5, limit=3) == log(10)[4:7]
    assert await replica.read(8, end=10) == log(10)[7:9]
    assert await replica.read(11) == []
    store.gate.set()
    await replica.close()


async def _event_of(events: list[IndexedEvent], index: int) -> IndexedEvent | None:
    return events[index - 1] if 0 < index <= len(events) else None


async def _state_at(events: list[IndexedEvent], index: int) -> State:
    state = State()
    for event in events[:index]:
        state = apply(state, event)
    return state


async def test_a_commit_cancelled_while_its_write_runs_still_applies_what_landed() -> None:
    replica, store = await gated_replica()
    await replica.commit(log(3))
    store.gate.clear()
    commit = asyncio.create_task(replica.commit(log(4, start=4)))
    await asyncio.sleep(0)  # the write is under way, waiting at the store
    commit.cancel()
    await asyncio.sleep(0)
    assert not commit.done(), "the caller waits for the write it started"
    store.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await commit
    # The store never runs ahead of the applied state: the next index is free in both.
    assert await store.last_index() == replica.last_index == replica.durable_index == 7
    await replica.commit(log(1, start=8))
    assert [event.index for event in await store.read(1)] == list(range(1, 9))
