"""The `global_events` topic: the master publishes each committed event once it is applied, so an
observer subscribed to a node's PUB socket sees the final log in order, never an event that is
later replaced."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from exo.bus.sockets import SocketFactory
from exo.bus.transport import Bus
from exo.core import messages as m
from exo.core.events import NodeLabelled
from exo.node.cluster import ClusterMember
from exo.node.replica import restore
from exo.roles.raft import RaftTimings
from exo.store.sqlite import SqliteEventStore
from tests.harness.cluster_harness import free_port

DEADLINE_SECONDS = 30.0


async def test_the_master_publishes_committed_events_on_global_events(tmp_path: Path) -> None:
    store = SqliteEventStore(str(tmp_path / "events.db"))
    await store.open()
    context = zmq.asyncio.Context.instance()
    bus = Bus("n0", SocketFactory(context), bus_port=free_port(), bind_host="127.0.0.1")
    member = ClusterMember(
        "n0",
        bus,
        await restore(store),
        tmp_path / "term",
        interval=0.1,
        timings=RaftTimings(election_timeout=0.3, heartbeat_interval=0.05),
    )
    await bus.start()
    await member.start()
    observer = context.socket(zmq.SUB)
    observer.setsockopt(zmq.SUBSCRIBE, m.TOPIC_GLOBAL_EVENTS)
    observer.connect(f"tcp://127.0.0.1:{bus.pub_port}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    try:
        # A SUB socket misses what was published before it connected: label until one arrives.
        seen: list[m.EventsPublished] = []
        attempt = 0
        while not any(isinstance(entry.event, NodeLabelled) for frame in seen for entry in frame.events):
            assert loop.time() < deadline, "no committed event published on global_events"
            if member.is_master:
                attempt += 1
                answer = await member.execute(m.LabelNode("n0", "seen", str(attempt)))
                assert isinstance(answer.answer, m.Labelled), answer
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    topic, payload = await observer.recv_multipart()
                    assert topic == m.TOPIC_GLOBAL_EVENTS
                    seen.append(msgspec.msgpack.decode(payload, type=m.EventsPublished))
        indexes = [entry.index for frame in seen for entry in frame.events]
        assert indexes == sorted(indexes) and len(set(indexes)) == len(indexes)
        assert all(frame.master_node_id == "n0" and frame.term == member.term for frame in seen)
        stored = {entry.index: entry for entry in await store.read(1)}
        assert all(stored[entry.index] == entry for frame in seen for entry in frame.events)
        assert max(indexes) <= member.replica.last_index  # applied (so committed) before published
    finally:
        observer.close(linger=0)
        await member.close()
        await bus.close()
        await store.close()
