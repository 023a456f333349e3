"""Raft driving real cluster members in process: three members on a loopback bus with SQLite
stores, short timeouts, and a test-side cut (a member's frames dropped both ways) for partitions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

from exo.bus.sockets import SocketFactory
from exo.bus.transport import Bus
from exo.core import messages as m
from exo.core.events import IndexedEvent, NodeLabelled
from exo.node.cluster import ClusterMember
from exo.node.replica import restore
from exo.roles.raft import RaftTimings
from exo.store.sqlite import SqliteEventStore
from tests.harness.cluster_harness import free_port

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


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp_path, [free_port() for _ in range(3)])
    for number in range(3):
        await cluster.add(number)
    try:
        yield cluster
    finally:
        await close_all(cluster)


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


async def test_a_follower_back_from_a_partition_does_not_depose_the_master(cluster: Cluster) -> None:
    """Pre-vote: cut off, the follower's election timer fires again and again, but it never wins a
    pre-vote, so its term stays and after the heal it follows the same master in the same term."""
    leader = await formed(cluster)
    term = leader.term
    follower = next(member for member in cluster.members if member is not leader)
    cluster.cut.add(follower.node_id)
    await until(lambda: follower.role == "pre_candidate", "the cut-off follower campaigning")
    cluster.cut.clear()
    await until(lambda: follower.leader_id == leader.node_id, "the follower back with its master")
    assert leader.is_master and leader.term == term and follower.term == term


async def test_a_cut_off_master_stops_acknowledging_and_its_tail_is_replaced(cluster: Cluster) -> None:
    """Check-quorum: the master in a minority steps down, so the command it took is refused (the
    API answers 503), never acknowledged. The majority elects another master and goes on; after
    the heal the old master's uncommitted entry is replaced by the majority's log."""
    old = await formed(cluster)
    cluster.cut.add(old.node_id)
    answer = await old.execute(m.LabelNode(old.node_id, "cut", "yes"))
    assert isinstance(answer.answer, m.Refused), answer
    assert labels(await stored(old), "cut") == ["yes"]  # in its log, uncommitted
    others = [member for member in cluster.members if member is not old]
    new = await until(lambda: cluster.leader(others), "a master among the majority")
    assert new.term > old.term - 1 and not old.is_master
    assert isinstance((await new.execute(m.LabelNode(new.node_id, "after", "cut"))).answer, m.Labelled)
    cluster.cut.clear()
    log = await logs_agree(cluster.members)
    assert labels(log, "cut") == [] and labels(log, "after") == ["cut"]
    await until(lambda: old.state.nodes[new.node_id].labels.get("after") == "cut", "the old master applying")
    assert all("cut" not in node.labels for member in cluster.members for node in member.state.nodes.values())


async def test_a_committed_event_survives_kill_9_of_the_master_and_it_rejoins(cluster: Cluster) -> None:
    leader = await formed(cluster)
    answer = await leader.execute(m.LabelNode(leader.node_id, "durable", "yes"))
    assert isinstance(answer.answer, m.Labelled)
    number = cluster.members.index(leader)
    await crash(leader)
    others = [member for member in cluster.members if member is not leader]
    new = await until(lambda: cluster.leader(others), "a new master")
    for member in others:
        await until(
            lambda member=member: member.state.nodes[leader.node_id].labels.get("durable") == "yes",
            f"{member.node_id} holding the acknowledged label",
        )
    back = await cluster.add(number)
    # In its own log; applied once the master says it is committed (the commit index on disk is
    # recorded lazily, and a kill -9 may leave it behind: a lower value is safe).
    assert labels(await stored(back), "durable") == ["yes"]
    await until(lambda: back.leader_id == new.node_id, "the restarted node following the new master")
    await until(lambda: back.state.nodes[leader.node_id].labels.get("durable") == "yes", "applied again")
    await logs_agree(cluster.members)


async def test_a_voter_silent_past_remove_after_is_removed_by_the_majority(tmp_path: Path) -> None:
    """Membership is committed: a voter the master has not heard from for `remove_after` seconds is
    removed by a committed NodeRemoved, so the two left are the whole cluster (both needed, as
    before) and a third node can join in its place."""
    cluster = Cluster(tmp_path, [free_port() for _ in range(3)], timings=replace(TIMINGS, remove_after=1.0))
    try:
        for number in range(3):
            await cluster.add(number)
        leader = await formed(cluster)
        silent = next(member for member in cluster.members if member is not leader)
        cluster.cut.add(silent.node_id)
        others = [member for member in cluster.members if member is not silent]
        await until(
            lambda: all(silent.node_id not in member.state.nodes for member in others),
            "the silent voter removed on the majority",
        )
        master = await until(lambda: cluster.leader(others), "a master among the two")
        assert master.raft.core.voters == frozenset(member.node_id for member in others)
        answer = await master.execute(m.LabelNode(master.node_id, "after", "removal"))
        assert isinstance(answer.answer, m.Labelled), answer
    finally:
        await close_all(cluster)


@pytest.mark.parametrize(
    ("raw", "expected"), [("", 86_400.0), ("off", None), ("Never", None), ("90", 90.0), ("0.5", 0.5)]
)
def test_remove_after_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: float | None
) -> None:
    from exo.node.raft_member import remove_after_from_env

    monkeypatch.setenv("EXO_REMOVE_AFTER", raw)
    assert remove_after_from_env() == expected


@pytest.mark.parametrize("raw", ["soon", "-5", "0"])
def test_a_bad_remove_after_stops_the_node_with_its_reason(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    from exo.node.raft_member import remove_after_from_env

    monkeypatch.setenv("EXO_REMOVE_AFTER", raw)
    with pytest.raises(SystemExit, match="EXO_REMOVE_AFTER"):
        remove_after_from_env()
