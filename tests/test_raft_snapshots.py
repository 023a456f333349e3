"""Compaction and snapshot install on real members (exo/node/raft_snapshots.py): the core's log
stays bounded, a follower behind its master's compaction base catches up by installing the
master's snapshot, and a snapshot that cannot be installed is refused without losing anything."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from exo.core import messages as m
from exo.core.events import IndexedEvent, NodeJoined, NodeLabelled
from exo.core.fold import LogFold
from exo.core.state import encode_state
from exo.node import cluster_requests
from exo.node.cluster import ClusterMember
from exo.node.raft_snapshots import (
    SnapshotRejected,
    answer_snapshot,
    compact_every_from_env,
    state_from_answer,
)
from exo.node.replica import restore
from exo.store.base import Snapshot, StoreError
from exo.store.memory import InMemoryEventStore
from tests.harness.cluster_harness import free_port
from tests.harness.raft_cluster import Cluster, close_all, crash, formed, until

COMPACT_EVERY = 20
APPLY_BATCH_SLACK = 8


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.setenv("EXO_RAFT_COMPACT_EVERY", str(COMPACT_EVERY))
    cluster = Cluster(tmp_path, [free_port() for _ in range(3)])
    try:
        for number in range(3):
            await cluster.add(number)
        yield cluster
    finally:
        await close_all(cluster)


async def label(master: ClusterMember, key: str, count: int) -> None:
    for number in range(count):
        answer = await master.execute(m.LabelNode(master.node_id, key, str(number)))
        assert isinstance(answer.answer, m.Labelled), answer


def same_state(one: ClusterMember, other: ClusterMember) -> bool:
    return encode_state(one.state) == encode_state(other.state)


async def test_a_follower_behind_the_masters_compaction_installs_its_snapshot(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Cut off, the follower misses more than two compactions, so the entries it needs are gone
    from the master's core. A corrupt answer is refused and changes nothing; the real snapshot is
    installed (its /state equals the master's), later events apply on top, and a restart restores
    from it."""
    leader = await formed(cluster)
    follower = next(member for member in cluster.members if member is not leader)
    cluster.cut.add(follower.node_id)
    await label(leader, "during", 3 * COMPACT_EVERY)
    await until(lambda: leader.raft.core.base_index > follower.replica.last_index, "the master compacting")
    assert leader.raft.snapshot_index > leader.raft.core.base_index > 0

    # A truncated payload first: the follower refuses it and keeps its state and its log.
    async def truncated(store: object, index: int) -> m.Reply:
        del store
        whole = encode_state(leader.state)
        return m.SnapshotAnswered(index, whole[: len(whole) // 2])

    before_state, before_log = encode_state(follower.state), await follower.replica.store.read(1)
    monkeypatch.setattr(cluster_requests, "answer_snapshot", truncated)
    cluster.cut.clear()
    await until(lambda: follower.raft.snapshots_rejected >= 2, "the corrupt snapshot refused, twice")
    refusals = [
        record
        for record in caplog.records
        if "not installed" in record.getMessage() and record.levelno >= logging.WARNING
    ]
    # Warned once per offered index (the master may compact on meanwhile: liveness logs events too).
    warned = [record.args[0] if isinstance(record.args, tuple) else None for record in refusals]
    assert refusals and len(set(warned)) == len(warned)
    assert any("does not decode" in record.getMessage() for record in refusals)
    assert follower.raft.snapshots_installed == 0
    assert encode_state(follower.state) == before_state
    assert await follower.replica.store.read(1) == before_log

    # Then the follower's disk refuses the first write of the install: it is retried, not dropped.
    store = follower.replica.store
    save_snapshot = store.save_snapshot
    refused: list[int] = []

    async def full_once(snapshot: Snapshot) -> None:
        if not refused:
            refused.append(snapshot.index)
            raise StoreError("database or disk is full")
        await save_snapshot(snapshot)

    monkeypatch.setattr(store, "save_snapshot", full_once)
    monkeypatch.setattr(cluster_requests, "answer_snapshot", answer_snapshot)
    await until(lambda: follower.raft.snapshots_installed >= 1, "the snapshot installed")
    assert len(refused) == 1 and refused[0] <= follower.raft.snapshot_index and not follower.raft.stalled
    await until(lambda: same_state(follower, leader), "the follower's state equal to the master's")
    assert follower.raft.core.base_index >= refused[0] > 0  # the installed snapshot's index

    await label(leader, "after", 1)
    await until(
        lambda: follower.state.nodes[leader.node_id].labels.get("after") == "0",
        "a later event applied on top",
    )
    await until(lambda: same_state(follower, leader), "equal again")
    # Its store starts at the snapshot now; a restart restores the same state from it.
    assert (await follower.replica.store.first_index()) > 1
    number = cluster.members.index(follower)
    installed_at = follower.raft.snapshot_index
    await crash(follower)
    back = await cluster.add(number)
    assert back.state.last_event_index >= installed_at and back.raft.core.base_index >= installed_at
    await until(lambda: same_state(back, leader), "the restarted follower equal to the master")


async def test_the_cores_log_stays_bounded_and_the_store_keeps_every_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone node (its own majority) takes many events: its core holds at most two compaction
    intervals (plus what is not applied yet), the store still serves every event from index 1, and
    a restart from the newest snapshot gives the same state."""
    monkeypatch.setenv("EXO_RAFT_COMPACT_EVERY", str(COMPACT_EVERY))
    cluster = Cluster(tmp_path, [free_port()])
    try:
        member = await cluster.add(0)
        await until(lambda: member.is_master and member.node_id in member.state.nodes, "a cluster of one")
        longest = 0
        for round_ in range(10):
            await label(member, f"round{round_}", COMPACT_EVERY)
            core = member.raft.core
            held = len(core.log) - (core.last_index - core.applied)  # applied entries in memory
            longest = max(longest, held)
        assert member.raft.core.base_index >= 8 * COMPACT_EVERY
        # Two intervals, plus at most one apply batch past the threshold before its compaction runs.
        assert longest <= 2 * COMPACT_EVERY + APPLY_BATCH_SLACK
        events = await member.replica.read(1)
        assert [entry.index for entry in events] == list(range(1, member.replica.last_index + 1))
        labels = dict(member.state.nodes[member.node_id].labels)
        await member.close()
        await member.bus.close()
        await member.replica.store.close()
        back = await cluster.add(0)  # restored from its newest snapshot and the events after it
        assert back.raft.core.base_index >= 8 * COMPACT_EVERY
        assert back.state.nodes[back.node_id].labels == labels
    finally:
        await close_all(cluster)


# --- bad input and the pieces ---------------------------------------------------------------------


def folded(count: int) -> tuple[list[IndexedEvent], LogFold]:
    events = [IndexedEvent(1, 1, "n0", 1, NodeJoined("n0", "tcp://127.0.0.1:1"))]
    events += [
        IndexedEvent(index, 1, "n0", index, NodeLabelled("n0", "k", str(index)))
        for index in range(2, count + 1)
    ]
    fold = LogFold(None)
    fold.feed(events)
    return events, fold


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (m.SnapshotAnswered(5, b"\x93\x01"), "does not decode"),
        (m.SnapshotAnswered(5, b""), "does not decode"),
        (m.SnapshotAnswered(6, b""), "sent the snapshot at 6, not the one at 5"),
        (m.RequestFailed("no snapshot at 5 here (none)"), "refused the snapshot at 5: no snapshot"),
        (m.EventsAnswered([], 0, 1), "answered EventsAnswered"),
    ],
)
def test_an_unusable_snapshot_answer_is_refused_with_its_reason(reply: m.Reply, reason: str) -> None:
    with pytest.raises(SnapshotRejected, match=reason):
        state_from_answer(reply, 5)


def test_a_snapshot_whose_state_is_at_another_index_is_refused() -> None:
    _, fold = folded(4)
    with pytest.raises(SnapshotRejected, match="holds the state after index 4"):
        state_from_answer(m.SnapshotAnswered(5, encode_state(fold.state())), 5)


async def test_a_node_answers_only_the_snapshot_at_the_asked_index() -> None:
    store = InMemoryEventStore()
    await store.open()
    events, fold = folded(8)
    await store.append(events)
    assert await answer_snapshot(store, 8) == m.RequestFailed("no snapshot at 8 here (none)")
    await store.save_snapshot(Snapshot(8, fold.state()))
    answer = await answer_snapshot(store, 8)
    assert isinstance(answer, m.SnapshotAnswered)
    assert state_from_answer(answer, 8) == fold.state()
    assert await answer_snapshot(store, 7) == m.RequestFailed("no snapshot at 7 here (newest at 8)")


async def test_a_snapshot_newer_than_the_recorded_commit_index_restores() -> None:
    """A crash between storing an installed snapshot and recording the commit index: every snapshot
    is committed state, so the node restores from it rather than stopping on a gap."""
    store = InMemoryEventStore()
    await store.open()
    events, fold = folded(12)
    await store.append(events[:3])
    await store.save_commit_index(2)
    await store.save_snapshot(Snapshot(12, fold.state()))  # past the stored events: they go
    replica = await restore(store)
    assert replica.state == fold.state()
    assert replica.log.base_index == 12 and replica.log.entries == []


@pytest.mark.parametrize(("raw", "expected"), [("", 10_000), ("500", 500), (" 1 ", 1)])
def test_compact_every_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: int
) -> None:
    monkeypatch.setenv("EXO_RAFT_COMPACT_EVERY", raw)
    assert compact_every_from_env() == expected


@pytest.mark.parametrize("raw", ["lots", "0", "-3", "1.5"])
def test_a_bad_compact_every_stops_the_node_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("EXO_RAFT_COMPACT_EVERY", raw)
    with pytest.raises(SystemExit, match="EXO_RAFT_COMPACT_EVERY"):
        compact_every_from_env()
