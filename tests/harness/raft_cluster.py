"""Real cluster members in one process for Raft tests: three members on a loopback bus with SQLite
stores, short timeouts, and a test-side cut (a member's frames dropped both ways) for partitions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq.asyncio

from exo.bus.sockets import SocketFactory
from exo.bus.transport import Bus
from exo.core.events import IndexedEvent, NodeLabelled
from exo.node.cluster import ClusterMember
from exo.node.replica import restore
from exo.roles.raft import RaftTimings
from exo.store.sqlite import SqliteEventStore

TIMINGS = RaftTimings(election_timeout=0.3, heartbeat_interval=0.05)
INTERVAL = 0.1
SETTLE_SECONDS = 30.0  # generous: the 2-core CI machine runs other suites alongside


@dataclass
class Cluster:
    tmp_path: Path
    ports: list[int]
    members: list[ClusterMember] = field(default_factory=list[ClusterMember])
    cut: set[str] = field(default_factory=set[str])
    timings: RaftTimings = TIMINGS

    async def add(self, number: int) -> ClusterMember:
        node_id = f"n{number}"
        data_dir = self.tmp_path / node_id
        data_dir.mkdir(exist_ok=True)
        store = SqliteEventStore(str(data_dir / "events.db"))
        await store.open()
        bus = Bus(
            node_id,
            SocketFactory(zmq.asyncio.Context.instance()),
            bus_port=self.ports[number],
            bind_host="127.0.0.1",
        )
        member = ClusterMember(
            node_id, bus, await restore(store), data_dir / "term", interval=INTERVAL, timings=self.timings
        )
        self._wire_cut(member)
        await bus.start()
        await member.start()
        for port in self.ports:
            if port != bus.bus_port:
                bus.add_peer(f"127.0.0.1:{port}")
        if number < len(self.members):
            self.members[number] = member
        else:
            self.members.append(member)
        return member

    def _wire_cut(self, member: ClusterMember) -> None:
        """While `member` is in `cut`, nothing it publishes leaves and no Raft message reaches it."""
        publish, receive = member.bus.publish, member.raft.receive

        def cut_publish(topic: bytes, message: Any) -> None:
            if member.node_id not in self.cut:
                publish(topic, message)

        def cut_receive(message: Any) -> None:
            if member.node_id not in self.cut:
                receive(message)

        member.bus.publish = cut_publish  # type: ignore[method-assign]
        member.raft.receive = cut_receive  # type: ignore[method-assign]

    def leader(self, among: list[ClusterMember] | None = None) -> ClusterMember | None:
        leaders = [member for member in among or self.members if member.is_master]
        return max(leaders, key=lambda member: member.term) if leaders else None


async def crash(member: ClusterMember) -> None:
    """As kill -9 leaves it: tasks stop where they are, nothing queued is written or recorded."""
    tasks = [*member._tasks, member.raft._disk_task]  # pyright: ignore[reportPrivateUsage]
    if member.master is not None:
        tasks.append(member.master._task)  # pyright: ignore[reportPrivateUsage]
    for task in tasks:
        if task is not None:
            task.cancel()
    await asyncio.gather(*(task for task in tasks if task is not None), return_exceptions=True)
    await member.bus.close()
    await member.replica.store.close()


async def close_all(cluster: Cluster) -> None:
    for member in cluster.members:
        with contextlib.suppress(Exception):
            await member.close()
        with contextlib.suppress(Exception):
            await member.bus.close()
        with contextlib.suppress(Exception):
            await member.replica.store.close()


async def until(predicate: Callable[[], object], what: str, seconds: float = SETTLE_SECONDS) -> Any:
    deadline = asyncio.get_running_loop().time() + seconds
    while not (value := predicate()):
        assert asyncio.get_running_loop().time() < deadline, f"not {what}"
        await asyncio.sleep(0.02)
    return value


async def formed(cluster: Cluster) -> ClusterMember:
    """All three are voters and applied the same log; returns the master."""
    return await until(
        lambda: (
            (leader := cluster.leader()) is not None
            and all(len(member.state.nodes) == 3 for member in cluster.members)
            and len({member.replica.last_index for member in cluster.members}) == 1
            and leader.raft.core.voters == frozenset({"n0", "n1", "n2"})
            and leader
        ),
        "three voters agreeing",
    )


async def stored(member: ClusterMember) -> list[IndexedEvent]:
    return await member.replica.store.read(1)


async def logs_agree(members: list[ClusterMember]) -> list[IndexedEvent]:
    deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
    while True:
        logs = [await stored(member) for member in members]
        if all(log == logs[0] for log in logs):
            return logs[0]
        assert asyncio.get_running_loop().time() < deadline, [len(log) for log in logs]
        await asyncio.sleep(0.05)


def labels(events: list[IndexedEvent], key: str) -> list[str]:
    return [
        entry.event.value
        for entry in events
        if isinstance(entry.event, NodeLabelled) and entry.event.key == key
    ]
