"""ClusterMember alone, in process (one member, a real bus on loopback, no peers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq.asyncio

from exo.bus.sockets import SocketFactory
from exo.bus.transport import Bus
from exo.core import messages as m
from exo.core.events import NodeLabelled
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


async def test_a_lone_node_bootstraps_its_own_cluster_and_commits_alone(member: ClusterMember) -> None:
    """No peer heard within a liveness window: the node starts a cluster of one (its own majority)
    and a command is answered once committed."""
    await member.start()
    assert await member.replica.wait_for(lambda state: state.master_node_id == "n1", 10)
    assert member.raft.core.voters == frozenset({"n1"}) and member.has_quorum()
    answer = await member.execute(m.LabelNode("n1", "k", "v"))
    assert isinstance(answer.answer, m.Labelled)
    assert member.state.nodes["n1"].labels == {"k": "v"}
    member.submit([NodeLabelled("n1", "local", "yes")])
    assert await member.replica.wait_for(lambda state: state.nodes["n1"].labels.get("local") == "yes", 10)
