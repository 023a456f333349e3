"""The Raft shell's apply path (exo/node/raft_member.py): a committed entry is applied once the
store holds it, without waiting for the writes of later entries, and never before its own write
(a truncating one included)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from exo.core.events import IndexedEvent, NodeLabelled
from exo.core.raft_messages import EntriesSent
from exo.core.state import State
from exo.node.disk_faults import DiskFaults
from exo.node.raft_member import RaftMember
from exo.node.replica import Replica
from exo.roles.raft import RaftTimings
from exo.store.memory import InMemoryEventStore


class GatedStore(InMemoryEventStore):
    """Appends wait while `gate` is clear (a slow fsync)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()
        self.wrote = asyncio.Condition()
        self.written = 0

    async def append(self, events: Sequence[IndexedEvent]) -> None:
        self.writing.set()
        await self.gate.wait()
        await super().append(events)
        async with self.wrote:
            self.written = events[-1].index
            self.wrote.notify_all()

    async def holds(self, index: int) -> None:
        async with asyncio.timeout(5), self.wrote:
            await self.wrote.wait_for(lambda: self.written >= index)


class NoBus:
    def publish(self, topic: bytes, message: object) -> None:
        pass


def entry(index: int, term: int) -> IndexedEvent:
    return IndexedEvent(index, term, "leader", index, NodeLabelled("leader", "k", str(index)))


def entries_sent(term: int, prev: int, prev_term: int, new: list[IndexedEvent], commit: int) -> EntriesSent:
    return EntriesSent(term, "leader", "me", prev, prev_term, new, commit)


async def wait_applied(replica: Replica, index: int) -> None:
    assert await replica.wait_for(lambda state: state.last_event_index >= index, 5.0)


async def member(tmp_path: Path) -> tuple[RaftMember, GatedStore]:
    store = GatedStore()
    await store.open()
    raft = RaftMember(
        "me",
        NoBus(),  # type: ignore[arg-type]
        Replica(store, State()),
        tmp_path / "term",
        DiskFaults(),
        on_applied=lambda entries: None,
        on_role=lambda change: None,
        timings=RaftTimings(election_timeout=60.0),
    )
    raft.start()
    return raft, store


@pytest.mark.asyncio
async def test_a_commit_is_applied_while_a_later_entry_is_still_being_written(tmp_path: Path) -> None:
    raft, store = await member(tmp_path)
    raft.receive(entries_sent(1, 0, 0, [entry(1, 1)], 0))
    await store.holds(1)
    store.gate.clear()
    store.writing.clear()
    raft.receive(entries_sent(1, 1, 1, [entry(2, 1)], 0))
    await asyncio.wait_for(store.writing.wait(), 5)  # entry 2's write is under way, and stuck
    raft.receive(entries_sent(1, 2, 1, [], 1))  # the commit of entry 1 arrives meanwhile
    await wait_applied(raft.replica, 1)
    assert raft.replica.last_index == 1
    store.gate.set()
    await raft.close()


@pytest.mark.asyncio
async def test_a_committed_entry_replacing_a_stored_one_waits_for_its_own_write(tmp_path: Path) -> None:
    raft, store = await member(tmp_path)
    raft.receive(entries_sent(1, 0, 0, [entry(1, 1), entry(2, 1)], 0))
    await store.holds(2)
    store.gate.clear()
    store.writing.clear()
    # A master of term 2 replaces entry 2 and commits its own entry 2 at once.
    raft.receive(entries_sent(2, 1, 1, [entry(2, 2)], 2))
    await asyncio.wait_for(store.writing.wait(), 5)
    for _ in range(20):
        await asyncio.sleep(0)  # let the apply task run if it (wrongly) could
    assert raft.replica.last_index < 2, "entry 2 of term 2 is applied only once the store holds it"
    store.gate.set()
    await wait_applied(raft.replica, 2)
    assert raft.replica.state.last_event_index == 2
    assert [e.term for e in await store.read(1)] == [1, 2]
    await raft.close()
