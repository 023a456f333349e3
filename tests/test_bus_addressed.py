"""Raft's messages are point to point: on the bus they travel as `election/ADDRESSEE/` and a node
subscribes to its own suffix only, so another node's messages never reach its Python code."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from exo.bus.sockets import SocketFactory
from exo.bus.transport import Bus, addressed_topic
from exo.core import messages as m
from exo.core.raft_messages import RaftMessage, VoteRequested
from tests.harness.cluster_harness import free_port

DEADLINE_SECONDS = 30.0


async def hello_handler(bus: Bus, request: m.Request, peer_host: str) -> m.Reply:
    assert isinstance(request, m.HelloRequested)
    bus.add_peer(f"{request.bus_host or peer_host}:{request.bus_port}")
    return m.HelloAnswered(node_id=bus.node_id, pub_port=bus.pub_port, term=0, master_node_id=None)


@pytest.fixture
async def buses() -> AsyncIterator[tuple[list[Bus], dict[str, list[RaftMessage]]]]:
    context = zmq.asyncio.Context.instance()
    buses = [
        Bus(name, SocketFactory(context), bus_port=free_port(), bind_host="127.0.0.1")
        for name in ("n0", "n1", "n2")
    ]
    heard: dict[str, list[RaftMessage]] = {bus.node_id: [] for bus in buses}
    for bus in buses:
        bus.on_topic(m.TOPIC_ELECTION, heard[bus.node_id].append)
        bus.on_request(lambda request, host, bus=bus: hello_handler(bus, request, host))
        await bus.start()
    for bus in buses[1:]:
        buses[0].add_peer(f"127.0.0.1:{bus.bus_port}")
    try:
        yield buses, heard
    finally:
        for bus in buses:
            with contextlib.suppress(Exception):
                await bus.close()


def vote(to: str, term: int) -> VoteRequested:
    return VoteRequested(term=term, candidate_id="n0", to=to, last_log_index=0, last_log_term=0)


async def test_an_addressed_message_reaches_its_addressee_only(
    buses: tuple[list[Bus], dict[str, list[RaftMessage]]],
) -> None:
    (sender, _, _), heard = buses
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    term = 0
    # A SUB socket misses what was published before it connected: send until each has heard one.
    while not (heard["n1"] and heard["n2"]):
        assert loop.time() < deadline, f"not delivered: {heard}"
        term += 1
        sender.publish(m.TOPIC_ELECTION, vote("n1", term))
        sender.publish(m.TOPIC_ELECTION, vote("n2", term))
        await asyncio.sleep(0.02)
    # Frames from one publisher arrive in order: had n2's subscription let n1's through, they
    # would be here before n2's own.
    assert all(message.to == "n1" for message in heard["n1"])
    assert all(message.to == "n2" for message in heard["n2"])
    assert heard["n0"] == []  # nobody published to n0, and its own PUB is not read back


def test_the_topic_names_its_addressee_between_separators() -> None:
    """A prefix subscription to election/n1/ must not take election/n10/'s messages too."""
    assert addressed_topic(m.TOPIC_ELECTION, "n1") == b"election/n1/"
    assert not addressed_topic(m.TOPIC_ELECTION, "n10").startswith(addressed_topic(m.TOPIC_ELECTION, "n1"))
