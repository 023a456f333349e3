"""The SQLite store's single writer: one connection held for the store's life, the last index in memory.

Why not an append through SQLAlchemy's pool: pool checkout, the BEGIN hook, a last-index select, a
compiled insert of dict rows, commit and the reset on return cost about 4 ms for one event and 22 ms
for 1,024 on the development VM; BEGIN IMMEDIATE + executemany of tuples + COMMIT on the aiosqlite
connection itself cost 0.6 ms and 7 ms (docs/event-store.md). The store is the only writer of its
file, so the last index needs no select. Rarer writes (snapshots, truncation) still go through
SQLAlchemy, on this same connection, so the file never has two writer connections.

Callers serialise every use (the store's write lock).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiosqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from exo.store.schema import events_table, snapshots_table

EventRow = tuple[int, int, str, bytes]

_INSERT_EVENTS = (
    f"INSERT INTO {events_table.name} ({', '.join(column.name for column in events_table.columns)}) "
    "VALUES (?, ?, ?, ?)"
)
_LAST_INDEX = (
    f"SELECT max(coalesce((SELECT max(event_index) FROM {events_table.name}), 0), "
    f"coalesce((SELECT max(event_index) FROM {snapshots_table.name}), 0))"
)


class SqliteEventWriter:
    def __init__(self, connection: AsyncConnection, driver: aiosqlite.Connection, last_index: int) -> None:
        self.connection = connection
        self._driver = driver
        # None after a write whose outcome is unknown (an error, or a cancelled caller): read again.
        self._last_index: int | None = last_index

    @classmethod
    async def open(cls, engine: AsyncEngine, **execution_options: Any) -> SqliteEventWriter:
        connection = await engine.connect()
        try:
            await connection.execution_options(**execution_options)
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            if not isinstance(driver, aiosqlite.Connection):
                raise TypeError(f"expected an aiosqlite connection, got {type(driver).__name__}")
            writer = cls(connection, driver, 0)
            writer._last_index = await writer._read_last_index()
        except BaseException:
            await connection.close()
            raise
        return writer

    async def close(self) -> None:
        await self.connection.close()

    async def last_index(self) -> int:
        if self._last_index is None:
            await self._recover()
        assert self._last_index is not None
        return self._last_index

    async def insert(self, rows: Sequence[EventRow]) -> None:
        """Insert rows that continue the log (checked by the caller) in one durable transaction."""
        if self._last_index is None:
            await self._recover()
        last_index = rows[-1][0]
        # Unknown until COMMIT returns: a failure or a cancellation in between leaves it to _recover.
        self._last_index = None
        try:
            await self._driver.execute("BEGIN IMMEDIATE")
            await self._driver.executemany(_INSERT_EVENTS, rows)
            await self._driver.execute("COMMIT")
        except Exception:
            await self._recover()
            raise
        self._last_index = last_index

    def forget_last_index(self) -> None:
        """The log changed through SQLAlchemy on this connection (truncation, snapshot): read it again."""
        self._last_index = None

    async def pragma(self, name: str) -> object:
        """A setting of the connection that writes the log (journal_mode, synchronous, busy_timeout)."""
        if not name.isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        async with self._driver.execute(f"PRAGMA {name}") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return row[0]

    async def _recover(self) -> None:
        # The driver runs calls in order, so once this round trip answers, anything a cancelled
        # caller queued has run; a transaction it left open is rolled back before the log is read.
        await self._driver.execute("SELECT 1")
        if self._driver.in_transaction:
            await self._driver.rollback()
        self._last_index = await self._read_last_index()

    async def _read_last_index(self) -> int:
        async with self._driver.execute(_LAST_INDEX) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])
