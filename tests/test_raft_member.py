"""Raft driving real cluster members in process: three members on a loopback bus with SQLite
stores, short timeouts, and a test-side cut (a member's frames dropped both ways) for partitions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from exo.core import messages as m
from tests.harness.cluster_harness import free_port
from tests.harness.raft_cluster import (
    TIMINGS,
    Cluster,
    close_all,
    crash,
    formed,
    labels,
    logs_agree,
    stored,
    until,
)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp_path, [free_port() for _ in range(3)])
    for number in range(3):
        await cluster.add(number)
    try:
        yield cluster
    finally:
        await close_all(cluster)


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
