"""WAL checkpoints run on the store's own thread, never inside a commit (exo/store/wal_checkpoint.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from exo.core.events import IndexedEvent, NodeLabelled
from exo.store import SqliteEventStore
from exo.store.wal_checkpoint import WalCheckpointer

DEADLINE_SECONDS = 10.0


def labelled(index: int) -> IndexedEvent:
    return IndexedEvent(index, 1, "node0", index, NodeLabelled("node0", "step", str(index)))


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_SECONDS}s: {what}")
        time.sleep(0.01)


async def wait_for_async(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_SECONDS}s: {what}")
        await asyncio.sleep(0.01)


def file_size(path: Path) -> int:
    return path.stat().st_size


async def append_one_by_one(store: SqliteEventStore, first: int, count: int) -> None:
    for index in range(first, first + count):
        await store.append_now([labelled(index)])


async def test_no_connection_of_the_store_checkpoints_inside_a_commit(tmp_path: Path) -> None:
    store = SqliteEventStore(str(tmp_path / "events.db"))
    await store.open()
    try:
        assert await store.write_pragma("wal_autocheckpoint") == 0
        async with store._require_engine().connect() as connection:  # pyright: ignore[reportPrivateUsage]
            assert (await connection.execute(text("PRAGMA wal_autocheckpoint"))).scalar() == 0
    finally:
        await store.close()


async def test_the_checkpointer_keeps_the_wal_from_growing_with_the_log(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    wal = Path(f"{path}-wal")
    store = SqliteEventStore(str(path))
    await store.open()
    checkpointer = store.wal_checkpointer
    assert checkpointer is not None and checkpointer.lifecycle == "running"
    sizes: list[int] = []
    try:
        for round_number in range(3):
            # A page or more per commit: 400 commits make a WAL of 1.6 MB or more.
            await append_one_by_one(store, 1 + 400 * round_number, 400)
            sizes.append(file_size(wal))
            done = checkpointer.checkpoints
            # A checkpoint that started after the appends, and copied every frame back.
            await wait_for_async(
                lambda done=done: (
                    checkpointer.checkpoints > done + 1
                    and checkpointer.last_result is not None
                    and checkpointer.last_result[1] == checkpointer.last_result[2]
                ),
                "a complete checkpoint",
            )
    finally:
        await store.close()
    assert checkpointer.lifecycle == "stopped"
    # The next commit after a complete checkpoint starts the WAL over: it stops growing.
    assert sizes[0] >= 400 * 4096
    assert sizes[2] <= sizes[0] * 1.1, sizes
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM events").fetchone()[0] == 1200


def test_a_checkpointer_that_cannot_open_the_log_counts_the_failure_and_stops_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpointer = WalCheckpointer(tmp_path / "missing" / "events.db", "full", 100, interval_seconds=0.01)
    checkpointer.start()
    try:
        wait_for(lambda: checkpointer.failures >= 3, "three failed checkpoints")
    finally:
        checkpointer.stop()
    assert checkpointer.lifecycle == "stopped" and checkpointer.checkpoints == 0
    assert checkpointer.last_error is not None and "unable to open" in checkpointer.last_error
    # Logged once for the same error, not every interval.
    assert len([record for record in caplog.records if "WAL checkpoint" in record.getMessage()]) == 1


def test_a_checkpointer_starts_once() -> None:
    checkpointer = WalCheckpointer(Path("unused.db"), "full", 100)
    checkpointer.stop()  # never started: nothing to wait for
    assert checkpointer.lifecycle == "stopped"
    with pytest.raises(RuntimeError, match="stopped"):
        checkpointer.start()
