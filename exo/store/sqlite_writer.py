"""The SQLite store's single writer: one connection on one thread, a whole batch per call.

Not an append through SQLAlchemy's pool (checkout, hooks and dict rows cost more than the insert)
nor aiosqlite statement by statement (a round trip into its thread per statement, slow under CPU
load); docs/benchmarks-store.md has the figures. Here a batch (BEGIN IMMEDIATE, executemany, COMMIT, or
ROLLBACK on error) is one call into this thread: it always runs to its end, even when the awaiting
caller is cancelled. The store is the only writer of its file, so the last index lives in memory.

`insert_now` writes on the caller's thread instead, blocking it for the commit: for the master's
sequencer, whose next step (apply, publish) waits for the commit anyway: the hop into the thread
and back cost more than the commit itself there (docs/benchmarks-store.md). A lock keeps the two
ways from using the connection at once.

The connection takes the same settings as the store's SQLAlchemy connections (WAL, `synchronous`,
busy timeout); callers serialise every use (the store's write lock).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from exo.store.location import Synchronous
from exo.store.schema import events_table, snapshots_table

EventRow = tuple[int, int, str, bytes]
_Result = TypeVar("_Result")

_INSERT_EVENTS = (
    f"INSERT INTO {events_table.name} ({', '.join(column.name for column in events_table.columns)}) "
    "VALUES (?, ?, ?, ?)"
)
_LAST_INDEX = (
    f"SELECT max(coalesce((SELECT max(event_index) FROM {events_table.name}), 0), "
    f"coalesce((SELECT max(event_index) FROM {snapshots_table.name}), 0))"
)


def apply_log_pragmas(connection: Any, synchronous: Synchronous, busy_timeout_ms: int) -> None:
    """What every connection to an event log sets (this writer's and SQLAlchemy's): WAL, the
    durability level, how long a write waits for another connection's lock, and no checkpoint
    inside a commit (the store's WalCheckpointer thread runs them, see exo/store/wal_checkpoint.py)."""
    cursor = connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        cursor.execute("PRAGMA wal_autocheckpoint = 0")
    finally:
        cursor.close()


def connect_to_log(path: Path, synchronous: Synchronous, busy_timeout_ms: int) -> sqlite3.Connection:
    """A stdlib connection to an event log with `apply_log_pragmas` set. isolation_level=None:
    transactions are the caller's (BEGIN IMMEDIATE), never the driver's implicit ones;
    check_same_thread off: the caller serialises its use across threads."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        apply_log_pragmas(connection, synchronous, busy_timeout_ms)
    except BaseException:
        connection.close()
        raise
    return connection


class SqliteEventWriter:
    def __init__(self, path: Path, synchronous: Synchronous, busy_timeout_ms: int) -> None:
        self._path = path
        self._synchronous: Synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exo-event-writer")
        self._connection_lock = threading.Lock()  # the writer thread's calls and insert_now
        # Used on the writer thread, and by insert_now on the caller's; always under _connection_lock.
        self._connection: sqlite3.Connection | None = None
        # None while unknown (a write that failed or whose caller was cancelled): read it again.
        self._last_index: int | None = None

    async def open(self) -> None:
        try:
            self._last_index = await self._call(self._connect)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        try:
            await self._call(self._disconnect)
        finally:
            self._thread.shutdown(wait=False)

    async def last_index(self) -> int:
        if self._last_index is None:
            self._last_index = await self._call(self._read_last_index)
        return self._last_index

    async def insert(self, rows: Sequence[EventRow]) -> None:
        """Insert rows that continue the log (checked by the caller) in one durable transaction."""
        last_index = rows[-1][0]
        # Unknown until the call returns: if the caller is cancelled meanwhile, the write still runs
        # to its end on the thread, and the next call reads what it left.
        self._last_index = None
        await self._call(self._insert, rows)
        self._last_index = last_index

    def insert_now(self, rows: Sequence[EventRow]) -> None:
        """`insert` on the caller's thread (see the module docstring)."""
        with self._connection_lock:
            self._last_index = None
            self._insert(rows)
        self._last_index = rows[-1][0]

    def last_index_now(self) -> int:
        """`last_index` on the caller's thread."""
        if self._last_index is None:
            with self._connection_lock:
                self._last_index = self._read_last_index()
        return self._last_index

    def forget_last_index(self) -> None:
        """The log changed through another connection (truncation, snapshot): read it again."""
        self._last_index = None

    async def pragma(self, name: str) -> object:
        """A setting of the connection that writes the log (journal_mode, synchronous, busy_timeout)."""
        if not name.isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        return await self._call(self._read_pragma, name)

    async def _call(self, function: Callable[..., _Result], *arguments: object) -> _Result:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._locked, function, *arguments)

    def _locked(self, function: Callable[..., _Result], *arguments: object) -> _Result:
        with self._connection_lock:
            return function(*arguments)

    # --- under _connection_lock (on the writer thread, or the caller's for the *_now calls) ------

    def _connect(self) -> int:
        # Used on the writer thread and by insert_now on the caller's, under _connection_lock.
        self._connection = connect_to_log(self._path, self._synchronous, self._busy_timeout_ms)
        return self._read_last_index()

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _require_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise sqlite3.ProgrammingError("the event writer is closed")
        return self._connection

    def _insert(self, rows: Sequence[EventRow]) -> None:
        connection = self._require_connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(_INSERT_EVENTS, rows)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def _read_last_index(self) -> int:
        row = self._require_connection().execute(_LAST_INDEX).fetchone()
        return int(row[0])

    def _read_pragma(self, name: str) -> object:
        return self._require_connection().execute(f"PRAGMA {name}").fetchone()[0]
