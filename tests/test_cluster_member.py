"""ClusterMember's own ordering rules, in process (one member, a real bus on loopback, no peers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq.asyncio

from exo.bus.sockets import SocketFactory
from exo.bus.transport import Bus
from exo.core import messages as m
from exo.core.events import IndexedEvent, MasterElected, NodeLabelled
from exo.node.cluster import ClusterMember
from exo.node.replica import restore
from exo.store.memory import InMemoryEventStore
from tests.harness.cluster_harness import free_port


@pytest.fixture
async def member(tmp_path: Path) -> AsyncIterator[ClusterMember]:
    bus = Bus(
        "n1", SocketFactory(zmq.asyncio.Context.instance()), bus_port=free_port(), bind_host="127.0.0.1"
    )
    await bus.start()
    store = InMemoryEventStore()
    await store.open()
    member = ClusterMember("n1", bus, await restore(store), tmp_path / "term")
    try:
        yield member
    finally:
        await member.close()
        await bus.close()


def old_master_events(start: int, count: int) -> list[IndexedEvent]:
    return [
        IndexedEvent(index, 1, "n0", index, NodeLabelled("n0", "k", str(index)))
        for index in range(start, start + count)
    ]


async def test_a_promotion_applies_the_old_masters_queued_events_before_sequencing(
    member: ClusterMember,
) -> None:
    """Events the previous master published, still queued here when this node wins, come first:
    the new term's first index follows them (it used to be handed out again, and every commit
    after it was refused)."""
    member._apply_queue.put_nowait(old_master_events(1, 3))  # pyright: ignore[reportPrivateUsage]
    member._apply_queue.put_nowait(old_master_events(4, 2))  # pyright: ignore[reportPrivateUsage]
    member._apply_in_hand = old_master_events(6, 1)  # pyright: ignore[reportPrivateUsage]
    await member._become_master(2)  # pyright: ignore[reportPrivateUsage]
    assert member.master is not None
    applied = await member.replica.wait_for(lambda state: state.last_event_index >= 7, 10)
    assert applied, member.replica.last_index
    log = await member.replica.read(1)
    assert [event.index for event in log] == list(range(1, 8))
    assert [event.term for event in log] == [1] * 6 + [2]
    assert log[-1].event == MasterElected(term=2, node_id="n1")


async def test_nothing_of_a_new_master_is_appended_before_the_logs_are_compared(
    member: ClusterMember,
) -> None:
    """A node that switches to a new master (a healed partition) must not append that master's
    events to its own divergent tail: the two logs would then agree at their last index and the
    comparison would keep the tail (seen in the cable-pulled namespace test)."""
    member.election.master_node_id, member.election.master_term = "n9", 2
    published = m.EventsPublished(2, "n9", old_master_events(1, 2))
    member._on_global_events(published)  # pyright: ignore[reportPrivateUsage]
    assert member._apply_queue.empty()  # pyright: ignore[reportPrivateUsage]
    member._reconciled_with = ("n9", 2)  # pyright: ignore[reportPrivateUsage]
    member._on_global_events(published)  # pyright: ignore[reportPrivateUsage]
    assert member._apply_queue.qsize() == 1  # pyright: ignore[reportPrivateUsage]


async def test_a_node_named_in_its_own_peer_list_is_not_its_own_peer(member: ClusterMember) -> None:
    """`--peers` that names every node (the same list on each machine) includes this one: the hello
    answered by itself makes that address its own, not a peer in `/node_status`, and gossip that
    names it again does not dial it again."""
    bus = member.bus
    own = f"127.0.0.1:{bus.bus_port}"
    bus.add_peer(own)
    deadline = asyncio.get_running_loop().time() + 10
    while bus.self_address is None:
        assert asyncio.get_running_loop().time() < deadline, "no hello answered by this node"
        await asyncio.sleep(0.01)
    assert bus.self_address == own
    assert own not in bus.peers
    bus.add_peer(own)
    assert own not in bus.peers
    assert bus.known_addresses() == []
