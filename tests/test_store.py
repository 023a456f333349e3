"""Both event stores through one suite, then what only the SQLite store does: persistence,
durability across kill -9, and refusing files that are not ours without changing a byte."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from exo.core.events import IndexedEvent, NodeJoined
from exo.core.state import State, apply
from exo.store import EventStore, InMemoryEventStore, Snapshot, SqliteEventStore, StoreError, open_store
from exo.store.location import parse_store_url
from exo.store.migrate import head_revision
from tests.harness.store_events import events

REPO_ROOT = Path(__file__).resolve().parent.parent


def state_after(last: int) -> State:
    state = apply(State(), IndexedEvent(1, 1, "node0", 1, NodeJoined("node0", "10.0.0.1:52414")))
    for indexed in events(2, last):
        state = apply(state, indexed)
    return state


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    opened = open_store("memory://") if request.param == "memory" else open_store(str(tmp_path / "events.db"))
    await opened.open()
    yield opened
    await opened.close()


# --- the EventStore contract, for every store --------------------------------------------------


async def test_an_empty_store(store: EventStore) -> None:
    assert await store.last_index() == 0
    assert await store.first_index() == 1
    assert await store.read(1) == []
    assert await store.load_snapshot() is None


async def test_append_then_read_in_index_order(store: EventStore) -> None:
    await store.append(events(1, 5))
    await store.append(events(6, 10))
    assert await store.read(1) == events(1, 10)
    assert await store.read(4, 7) == events(4, 6)
    assert await store.read(3, limit=2) == events(3, 4)
    assert await store.read(9, 100, limit=50) == events(9, 10)
    assert await store.read(11) == []
    assert await store.last_index() == 10
    assert await store.first_index() == 1


async def test_concurrent_appends_land_in_call_order(store: EventStore) -> None:
    await asyncio.gather(*(store.append(events(start, start + 9)) for start in range(1, 100, 10)))
    assert await store.read(1) == events(1, 100)


async def test_an_empty_batch_is_a_no_op(store: EventStore) -> None:
    await store.append([])
    assert await store.last_index() == 0


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(events(5, 6), id="gap"),
        pytest.param(events(3, 4), id="repeat"),
        pytest.param([*events(4, 5), *events(7, 7)], id="hole-inside-the-batch"),
        pytest.param([*events(5, 5), *events(4, 4)], id="out-of-order"),
    ],
)
async def test_a_batch_that_does_not_continue_the_log_is_refused_whole(
    store: EventStore, batch: list[IndexedEvent]
) -> None:
    await store.append(events(1, 3))
    with pytest.raises(ValueError, match="does not continue the log"):
        await store.append(batch)
    assert await store.read(1) == events(1, 3)
    await store.append(events(4, 4))
    assert await store.last_index() == 4


async def test_append_now_keeps_the_same_log_rules_alongside_append(store: EventStore) -> None:
    await store.append_now(events(1, 3))
    with pytest.raises(ValueError, match="does not continue the log"):
        await store.append_now(events(5, 6))
    # both ways at once land in call order, each batch whole
    await asyncio.gather(
        store.append(events(4, 10)), store.append_now(events(11, 12)), store.append(events(13, 20))
    )
    await store.append_now(events(21, 21))
    assert await store.read(1) == events(1, 21)
    assert await store.last_index() == 21


async def test_the_first_event_must_be_index_one(store: EventStore) -> None:
    with pytest.raises(ValueError, match="expected 1"):
        await store.append(events(2, 3))


async def test_snapshots_save_and_load_newest_at_or_before(store: EventStore) -> None:
    await store.append(events(1, 30))
    for index in (10, 20):
        await store.save_snapshot(Snapshot(index, state_after(index)))
    newest = await store.load_snapshot()
    assert newest is not None and newest.index == 20 and newest.state == state_after(20)
    at_15 = await store.load_snapshot(15)
    assert at_15 is not None and at_15.index == 10 and at_15.state == state_after(10)
    assert await store.load_snapshot(9) is None
    assert await store.first_index() == 1


async def test_saving_a_snapshot_twice_at_one_index_keeps_the_last(store: EventStore) -> None:
    await store.append(events(1, 5))
    await store.save_snapshot(Snapshot(5, state_after(5)))
    replacement = state_after(5)
    await store.save_snapshot(Snapshot(5, replacement))
    loaded = await store.load_snapshot()
    assert loaded is not None and loaded.state == replacement


async def test_a_snapshot_must_match_its_state(store: EventStore) -> None:
    with pytest.raises(ValueError, match="last_event_index"):
        await store.save_snapshot(Snapshot(5, state_after(4)))
    assert await store.load_snapshot() is None


async def test_a_snapshot_past_the_events_replaces_them_and_the_log_continues_after_it(
    store: EventStore,
) -> None:
    # A node that catches up from the master's snapshot at 50 while it holds 1..10.
    await store.append(events(1, 10))
    await store.save_snapshot(Snapshot(50, state_after(50)))
    assert await store.read(1) == []
    assert (await store.first_index(), await store.last_index()) == (51, 50)
    with pytest.raises(ValueError, match="expected 51"):
        await store.append(events(11, 12))
    await store.append(events(51, 52))
    assert await store.read(1) == events(51, 52)
    assert (await store.first_index(), await store.last_index()) == (51, 52)


async def test_truncate_after_drops_the_tail_and_the_snapshots_in_it(store: EventStore) -> None:
    await store.append(events(1, 10))
    await store.save_snapshot(Snapshot(4, state_after(4)))
    await store.save_snapshot(Snapshot(8, state_after(8)))
    await store.truncate_after(6)
    assert await store.read(1) == events(1, 6)
    assert await store.last_index() == 6
    newest = await store.load_snapshot()
    assert newest is not None and newest.index == 4
    await store.append(events(7, 7))
    assert await store.last_index() == 7
    await store.truncate_after(0)
    assert (await store.last_index(), await store.read(1)) == (0, [])
    with pytest.raises(ValueError, match=">= 0"):
        await store.truncate_after(-1)


async def test_a_closed_store_refuses_work(store: EventStore) -> None:
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.append(events(1, 1))
    with pytest.raises(StoreError, match="not open"):
        await store.read(1)
    await store.open()


# --- open_store ------------------------------------------------------------------------------------


def test_open_store_picks_the_store_by_url(tmp_path: Path) -> None:
    assert isinstance(open_store("memory://"), InMemoryEventStore)
    for url in (f"sqlite+aiosqlite:///{tmp_path}/e.db", f"sqlite:///{tmp_path}/e.db", str(tmp_path / "e.db")):
        store = open_store(url)
        assert isinstance(store, SqliteEventStore)
        assert store.location.path == tmp_path / "e.db"
    assert parse_store_url("sqlite+aiosqlite:///relative.db").path == Path("relative.db")
    assert parse_store_url(f"{tmp_path}/e.db?x").path == tmp_path / "e.db?x"
    assert parse_store_url("sqlite+aiosqlite:///e.db?synchronous=normal").synchronous == "normal"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://localhost/exo", "unsupported event store URL scheme 'postgresql'"),
        ("redis://x", "unsupported event store URL scheme"),
        ("", "empty event store URL"),
        ("memory://somewhere", "takes no path"),
        ("sqlite+aiosqlite://host/e.db", "names a file, not a host"),
        ("sqlite+aiosqlite:///e.db?journal=off", "unsupported option"),
        ("sqlite+aiosqlite:///e.db?synchronous=off", "must be 'full' or 'normal'"),
    ],
)
def test_open_store_refuses_what_it_cannot_serve(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        open_store(url)


# --- SQLite only -------------------------------------------------------------------------------


async def test_sqlite_keeps_everything_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SqliteEventStore(str(path))
    await store.open()
    await store.append(events(1, 20))
    await store.save_snapshot(Snapshot(12, state_after(12)))
    await store.close()
    reopened = SqliteEventStore(f"sqlite+aiosqlite:///{path}")
    await reopened.open()
    assert await reopened.read(1) == events(1, 20)
    snapshot = await reopened.load_snapshot()
    assert snapshot is not None and snapshot.index == 12 and snapshot.state == state_after(12)
    await reopened.append(events(21, 21))
    await reopened.close()


async def test_sqlite_file_is_wal_tagged_and_at_the_head_revision(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SqliteEventStore(str(path))
    await store.open()
    await store.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)
        ]
        assert connection.execute("PRAGMA application_id").fetchone()[0] == 0x65786F00


async def test_sqlite_in_memory_database_works_without_a_file(tmp_path: Path) -> None:
    store = open_store("sqlite+aiosqlite://")
    assert isinstance(store, SqliteEventStore)
    await store.open()
    await store.append(events(1, 3))
    assert await store.read(2) == events(2, 3)
    # A private temporary file (the writer thread needs a file to share with the readers), gone on close.
    temporary = store._temporary_directory  # pyright: ignore[reportPrivateUsage]
    assert temporary is not None and os.path.isdir(temporary.name)  # noqa: ASYNC240
    await store.close()
    assert not os.path.exists(temporary.name)  # noqa: ASYNC240


async def test_an_empty_file_is_taken_as_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    path.touch()
    store = SqliteEventStore(str(path))
    await store.open()
    await store.append(events(1, 1))
    await store.close()


async def test_an_undecodable_row_is_a_store_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SqliteEventStore(str(path))
    await store.open()
    await store.append(events(1, 3))
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE events SET payload = x'c1c1' WHERE event_index = 2")
    with pytest.raises(StoreError, match=r"event 2 .* does not decode"):
        await store.read(1)
    await store.close()


async def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    store = SqliteEventStore(str(tmp_path / "no" / "such" / "events.db"))
    with pytest.raises(StoreError, match="does not exist"):
        await store.open()
    assert not (tmp_path / "no").exists()


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _truncated_store(path: Path) -> None:
    _write_store(path, 3000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _header_only(path: Path) -> None:
    _write_store(path, 10)
    path.write_bytes(path.read_bytes()[:60])


def _damaged_page(path: Path) -> None:
    # Size and header intact, one page of the events table zeroed: only a page-level check sees it.
    _write_store(path, 3000)
    with sqlite3.connect(path) as connection:
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        page_count = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.close()
    with path.open("r+b") as file:
        file.seek(page_size * (page_count // 2))
        file.write(bytes(page_size))


def _foreign_database(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO customers VALUES (1, 'ada')")
    connection.close()


def _foreign_application(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA application_id = 42")
    connection.close()


def _newer_revision(path: Path) -> None:
    _write_store(path, 5)
    _set_revision(path, "exo_9999")


def _foreign_alembic_revision(path: Path) -> None:
    _write_store(path, 5)
    _set_revision(path, "4f2a9c1b7e3d")


REFUSALS: list[tuple[Callable[[Path], None], str]] = [
    (_random_bytes, "not an SQLite database"),
    (_truncated_store, "corrupt"),
    (_header_only, "corrupt"),
    (_damaged_page, "corrupt"),
    (_foreign_database, "not an exo event store .*customers"),
    (_foreign_application, "belongs to another program"),
    (_newer_revision, "exo_9999, newer than this exo"),
    (_foreign_alembic_revision, "not an exo event store .*4f2a9c1b7e3d"),
]


@pytest.mark.parametrize(
    ("make", "message"), REFUSALS, ids=[make.__name__.strip("_") for make, _ in REFUSALS]
)
def test_refusals_leave_the_file_untouched(
    tmp_path: Path, make: Callable[[Path], None], message: str
) -> None:
    # A plain test that runs its own event loops: the files are made with a real store first.
    path = tmp_path / "events.db"
    make(path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    store = SqliteEventStore(str(path))
    with pytest.raises(StoreError, match=message):
        asyncio.run(store.open())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    with pytest.raises(StoreError, match="not open"):
        asyncio.run(store.last_index())


def _write_store(path: Path, count: int) -> None:
    async def write() -> None:
        store = SqliteEventStore(str(path))
        await store.open()
        await store.append(events(1, count))
        await store.close()

    asyncio.run(write())


def _set_revision(path: Path, revision: str) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    connection.close()


def _child_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }


KILL_WRITER = """
import asyncio, sys
from exo.store import SqliteEventStore
from tests.harness.store_events import events

async def main():
    store = SqliteEventStore(sys.argv[1])
    await store.open()
    index = 0
    while True:
        await store.append(events(index + 1, index + 8))
        index += 8
        print(index, flush=True)

asyncio.run(main())
"""


def test_acknowledged_batches_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", KILL_WRITER, str(path)],
        cwd=REPO_ROOT,
        env=_child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    acknowledged = 0
    try:
        for line in writer.stdout:
            acknowledged = int(line)
            if acknowledged >= 200:
                break
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert acknowledged >= 200, "the writer died before acknowledging enough batches"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        stored = connection.execute("SELECT count(*), max(event_index) FROM events").fetchone()
    connection.close()
    assert stored[1] >= acknowledged
    assert stored[0] == stored[1], "the stored events are contiguous from 1"


def test_a_store_another_process_holds_locked_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    _write_store(path, 3)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        store = SqliteEventStore(str(path), busy_timeout_seconds=0.05)
        with pytest.raises(StoreError, match=r"cannot open event store .*locked"):
            asyncio.run(store.open())
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# --- the SQLite writer: one held connection, the last index in memory ----------------------------


@pytest.mark.parametrize(("query", "expected"), [("", 2), ("?synchronous=normal", 1)])
async def test_the_connection_that_writes_the_log_is_wal_with_the_chosen_synchronous(
    tmp_path: Path, query: str, expected: int
) -> None:
    store = SqliteEventStore(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}{query}")
    await store.open()
    try:
        assert await store.write_pragma("journal_mode") == "wal"
        # 2 is FULL (the WAL is fsynced at every commit), 1 is NORMAL.
        assert await store.write_pragma("synchronous") == expected
        with pytest.raises(ValueError, match="not a pragma name"):
            await store.write_pragma("synchronous; DROP TABLE events")
    finally:
        await store.close()


@pytest.mark.parametrize("yields_before_cancel", [0, 1, 2, 3, 5, 8])
async def test_a_cancelled_append_leaves_a_store_that_continues_its_log(
    tmp_path: Path, yields_before_cancel: int
) -> None:
    store = SqliteEventStore(str(tmp_path / "events.db"))
    await store.open()
    try:
        await store.append(events(1, 10))
        append = asyncio.create_task(store.append(events(11, 2000)))
        for _ in range(yields_before_cancel):
            await asyncio.sleep(0)
        append.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await append
        # The batch landed whole or not at all, and the store knows which.
        last = await store.last_index()
        assert last in (10, 2000)
        await store.append(events(last + 1, last + 5))
        assert await store.read(1) == events(1, last + 5)
    finally:
        await store.close()


async def test_a_write_refused_by_the_database_is_a_store_error_and_the_log_continues(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SqliteEventStore(str(path), busy_timeout_seconds=0.05)
    await store.open()
    try:
        await store.append(events(1, 3))
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreError, match=r"cannot write events 4\.\.6 .*locked"):
                await store.append(events(4, 6))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert await store.last_index() == 3
        await store.append(events(4, 6))
        assert await store.read(1) == events(1, 6)
    finally:
        await store.close()


async def test_truncation_and_snapshots_keep_the_writers_last_index_honest(tmp_path: Path) -> None:
    store = SqliteEventStore(str(tmp_path / "events.db"))
    await store.open()
    try:
        await store.append(events(1, 20))
        await store.truncate_after(12)
        assert await store.last_index() == 12
        await store.append(events(13, 14))
        await store.save_snapshot(Snapshot(30, state_after(30)))
        assert await store.last_index() == 30
        with pytest.raises(ValueError, match="expected 31"):
            await store.append(events(15, 15))
        await store.append(events(31, 31))
        assert await store.read(1) == events(31, 31)
    finally:
        await store.close()


async def test_append_now_commits_on_the_callers_thread_and_append_on_the_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exo.store import sqlite_writer

    threads: list[int] = []
    insert = sqlite_writer.SqliteEventWriter._insert  # pyright: ignore[reportPrivateUsage]

    def recording_insert(self: sqlite_writer.SqliteEventWriter, rows: list[sqlite_writer.EventRow]) -> None:
        threads.append(threading.get_ident())
        insert(self, rows)

    monkeypatch.setattr(sqlite_writer.SqliteEventWriter, "_insert", recording_insert)
    store = open_store(str(tmp_path / "events.db"))
    await store.open()
    try:
        await store.append_now(events(1, 2))
        await store.append(events(3, 4))
    finally:
        await store.close()
    assert threads[0] == threading.get_ident() != threads[1]
    reopened = open_store(str(tmp_path / "events.db"))
    await reopened.open()
    try:
        assert await reopened.read(1) == events(1, 4)  # both committed to the file
    finally:
        await reopened.close()
