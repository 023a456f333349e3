"""Disk faults in process: three cluster members on a real loopback bus, one store and term file
refusing writes as a full disk does (ENOSPC), then taking them again when space returns."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
import zmq.asyncio

from exo.bus.sockets import SocketFactory
from exo.bus.transport import Bus
from exo.core.events import IndexedEvent, NodeLabelled
from exo.core.state import State
from exo.node import disk_faults
from exo.node.cluster import ClusterMember
from exo.node.disk_faults import write_term
from exo.node.replica import restore
from exo.store.base import StoreError
from exo.store.memory import InMemoryEventStore
from exo.store.sqlite import SqliteEventStore
from tests.harness.cluster_harness import free_port
from tests.harness.store_events import flip_one_byte_keeping_it_decodable

INTERVAL = 0.1  # heartbeats; a liveness window is 6 of them
SETTLE_SECONDS = 30.0  # generous: the 2-core CI machine runs other suites alongside


class FullDisk:
    """Which data dirs are on a full disk now."""

    def __init__(self) -> None:
        self.full: set[Path] = set()


class FaultyStore(InMemoryEventStore):
    """An in-memory store that refuses appends the way SQLite does on a full disk."""

    def __init__(self, disk: FullDisk, data_dir: Path) -> None:
        super().__init__()
        self.disk, self.data_dir = disk, data_dir

    def _check(self, events: Sequence[IndexedEvent]) -> None:
        if self.data_dir in self.disk.full and events:
            raise StoreError(
                f"cannot write events {events[0].index}..{events[-1].index}: database or disk is full"
            )

    async def append(self, events: Sequence[IndexedEvent]) -> None:
        self._check(events)
        await super().append(events)

    async def append_now(self, events: Sequence[IndexedEvent]) -> None:
        self._check(events)
        await super().append_now(events)


@pytest.fixture
async def cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[FullDisk, list[ClusterMember]]]:
    disk = FullDisk()
    real_write_term = disk_faults.write_term

    def write_term_on(path: Path, term: int, voted_for: str | None = None) -> None:
        if path.parent in disk.full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path.with_suffix(".tmp")))
        real_write_term(path, term, voted_for)

    monkeypatch.setattr(disk_faults, "write_term", write_term_on)
    ports = [free_port() for _ in range(3)]
    members: list[ClusterMember] = []
    buses: list[Bus] = []
    context = zmq.asyncio.Context.instance()
    for number, port in enumerate(ports):
        node_id = f"n{number}"
        data_dir = tmp_path / node_id
        data_dir.mkdir()
        bus = Bus(node_id, SocketFactory(context), bus_port=port, bind_host="127.0.0.1")
        store = FaultyStore(disk, data_dir)
        await store.open()
        member = ClusterMember(  # before the bus starts: it subscribes to the topics handled then
            node_id, bus, await restore(store), data_dir / "term", force_master=number == 0, interval=INTERVAL
        )
        await bus.start()
        buses.append(bus)
        members.append(member)
    for member in members:
        await member.start()
    for bus in buses:
        for port in ports:
            if port != bus.bus_port:
                bus.add_peer(f"127.0.0.1:{port}")
    try:
        yield disk, members
    finally:
        for member in members:
            disk.full.clear()
            await member.close()
        for bus in buses:
            await bus.close()


def test_a_term_write_that_fails_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "term"
    write_term(path, 3)

    def no_space(*_arguments: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_faults.os, "write", no_space)
    with pytest.raises(OSError, match="No space left"):
        write_term(path, 4)
    assert sorted(child.name for child in tmp_path.iterdir()) == ["term"]
    assert path.read_text() == "3\n"
    monkeypatch.undo()
    write_term(path, 5)
    assert path.read_text() == "5\n"


async def settle(members: Sequence[ClusterMember], predicate: Callable[[State], bool], what: str) -> None:
    """Wait until `predicate` holds on every member's applied state (deadline: SETTLE_SECONDS)."""
    deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
    for member in members:
        remaining = deadline - asyncio.get_running_loop().time()
        assert await member.replica.wait_for(predicate, max(remaining, 0.0)), f"{member.node_id}: not {what}"


def master_of(member: ClusterMember) -> str | None:
    return member.state.master_node_id


def label(state: State, node_id: str, key: str) -> str | None:
    node = state.nodes.get(node_id)
    return node.labels.get(key) if node is not None else None


async def test_a_master_that_cannot_write_steps_down_and_recovers_when_space_returns(
    cluster: tuple[FullDisk, list[ClusterMember]], tmp_path: Path
) -> None:
    disk, members = cluster
    first, second, third = members
    await settle(members, lambda state: state.master_node_id == "n0", "led by n0")
    disk.full.add(tmp_path / "n0")
    # A change submitted now reaches the master, whose store refuses it.
    second.submit([NodeLabelled("n1", "after", "full")])
    await settle(
        [second, third],
        lambda state: state.master_node_id in ("n1", "n2") and label(state, "n1", "after") == "full",
        "sequenced by another master",
    )
    assert first.master is None
    assert first.disk_faults.store_failures >= 1
    # Space returns: the old master catches up by itself and its log equals the others'.
    disk.full.clear()
    third.submit([NodeLabelled("n2", "after", "space")])
    await settle(members, lambda state: label(state, "n2", "after") == "space", "given the next change")
    await logs_agree(members)
    assert not (tmp_path / "n0" / "term.tmp").exists()


async def write_log(path: Path, count: int) -> None:
    store = SqliteEventStore(str(path))
    await store.open()
    await store.append(
        [
            IndexedEvent(index, 1, "n0", index, NodeLabelled("n0", "k", f"value-{index}"))
            for index in range(1, count + 1)
        ]
    )
    await store.close()


def test_a_node_refuses_to_start_on_a_log_whose_checksum_fails(tmp_path: Path) -> None:
    """One changed byte inside a stored event: the node names the index in one line and exits 2
    instead of replaying it (it used to bring back a deleted instance)."""
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    asyncio.run(write_log(data_dir / "events.db", 3))
    with sqlite3.connect(data_dir / "events.db") as connection:
        [payload] = connection.execute("SELECT payload FROM events WHERE event_index = 2").fetchone()
        changed = flip_one_byte_keeping_it_decodable(payload)
        connection.execute("UPDATE events SET payload = ? WHERE event_index = 2", (changed,))
    connection.close()
    argv = [sys.executable, "-m", "exo.node", "--data-dir", str(data_dir), "--no-api", "--no-discovery"]
    completed = subprocess.run(
        [*argv, "--bus-port", str(free_port())], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 2, completed.stderr
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("exo: event 2 in ") and "does not match its checksum" in last_line
    assert "Traceback" not in completed.stderr


async def test_a_follower_with_a_full_disk_catches_up_and_the_others_commit_without_it(
    cluster: tuple[FullDisk, list[ClusterMember]], tmp_path: Path
) -> None:
    """n1 cannot store: n0 and n2 are a majority and commit without it, while n1 applies nothing
    it does not hold (it used to apply first and store later). Then the master's disk fills: n1
    and n2 elect another. Once space returns every node catches up by itself (a follower that hit
    ENOSPC used to never apply another event) and the logs are equal."""
    disk, members = cluster
    first, second, third = members
    await settle(members, lambda state: state.master_node_id == "n0", "led by n0")
    disk.full.add(tmp_path / "n1")
    third.submit([NodeLabelled("n2", "step", "one")])
    await settle([first, third], lambda state: label(state, "n2", "step") == "one", "given the first change")
    assert label(second.state, "n2", "step") is None  # not stored there, so not applied there
    disk.full.clear()
    await settle(members, lambda state: label(state, "n2", "step") == "one", "caught up after space returned")
    disk.full.add(tmp_path / "n0")
    third.submit([NodeLabelled("n2", "step", "two")])
    await settle(
        [second, third],
        lambda state: state.master_node_id in ("n1", "n2") and label(state, "n2", "step") == "two",
        "sequenced by another master",
    )
    disk.full.clear()
    third.submit([NodeLabelled("n2", "step", "three")])
    await settle(members, lambda state: label(state, "n2", "step") == "three", "given the last change")
    logs = await logs_agree(members)
    assert [event.index for event in logs] == list(range(1, len(logs) + 1))
    assert first.master is None


async def logs_agree(members: Sequence[ClusterMember]) -> list[IndexedEvent]:
    """Poll until every member's stored log is the same (the master's tail reaches the others a
    heartbeat later); returns it."""
    deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
    while True:
        logs = [await member.replica.store.read(1) for member in members]
        if all(log == logs[0] for log in logs):
            return logs[0]
        assert asyncio.get_running_loop().time() < deadline, [len(log) for log in logs]
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to make room again)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 65536)
            file.flush()
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root; CI runs it as root")
async def test_a_real_full_disk_is_a_store_error_and_writes_resume_when_space_returns(tmp_path: Path) -> None:
    """What the fault injection above stands for, on a real 1 MiB tmpfs: SQLite's "database or
    disk is full" reaches the caller as a StoreError (what makes a master step down), the term
    file's write fails without leaving term.tmp, and both work again once space returns."""
    with tiny_tmpfs(tmp_path / "disk") as disk:
        store = SqliteEventStore(str(disk / "events.db"))
        await store.open()
        try:
            await store.append([IndexedEvent(1, 1, "n0", 1, NodeLabelled("n0", "k", "v"))])
            filler = fill(disk)
            big = [
                IndexedEvent(index, 1, "n0", index, NodeLabelled("n0", "k", "x" * 4096))
                for index in range(2, 200)
            ]
            with pytest.raises(StoreError, match="full"):
                await store.append(big)
            with pytest.raises(OSError) as raised:
                write_term(disk / "term", 7)
            assert raised.value.errno == errno.ENOSPC
            assert not (disk / "term.tmp").exists()
            filler.unlink()
            await store.append(big)
            write_term(disk / "term", 7)
            assert [event.index for event in await store.read(1)] == list(range(1, 200))
        finally:
            await store.close()
