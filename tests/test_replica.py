"""The replica shell over an in-memory store: restore, divergent-tail detection and truncation."""

from __future__ import annotations

from exo.events import IndexedEvent, MasterElected, NodeJoined, NodeLabelled
from exo.roles.replica import Replica, find_common_prefix, rebuild, restore
from exo.state import State
from exo.store.memory import InMemoryEventStore


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
    assert (await rebuild(replica.store, 10)).last_event_index == 10


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
    expected = await rebuild(replica.store, 25)
    await replica.truncate_after(25, expected)
    assert replica.last_index == 25
    assert await replica.store.last_index() == 25
    assert replica.state == expected
    await replica.commit(log(5, term=2, origin="new", start=26))
    assert replica.last_index == 30
