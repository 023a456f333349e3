"""The SQLite event store: SQLAlchemy 2 async on aiosqlite, WAL, one transaction per appended batch.

Schema, migrations, reads, snapshots and truncation go through SQLAlchemy; appended events go
through `SqliteEventWriter` (one connection on one thread, a batch per call, the last index in
memory). `sqlite+aiosqlite://` (no path) is a private temporary file, removed on close.

Durability: `synchronous=FULL` by default, so a batch that `append` returned from survives a kill -9
of the process *and* a power cut; `?synchronous=normal` keeps the kill -9 guarantee only (see
docs/event-store.md for the measurements behind the choice).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import Connection, delete, event, func, insert, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from exo.core.decoding import DECODE_ERRORS
from exo.core.events import IndexedEvent, event_type_name, indexed_event_decoder
from exo.core.state import decode_state, encode_state
from exo.store import rules
from exo.store.base import Snapshot, StoreError
from exo.store.checksum import checksum_problem, payload_checksum
from exo.store.location import Synchronous, parse_store_url
from exo.store.migrate import upgrade_to_head
from exo.store.schema import events_table, hard_state_table, snapshots_table
from exo.store.sqlite_file import inspect_sqlite_file
from exo.store.sqlite_writer import EventRow, SqliteEventWriter, apply_log_pragmas
from exo.store.wal_checkpoint import WalCheckpointer

# An execution option that makes the "begin" hook take the write lock up front (BEGIN IMMEDIATE),
# so a check-then-write transaction can never be refused half way by another writer.
_WRITE_TRANSACTION = "exo_write_transaction"


class SqliteEventStore:
    def __init__(
        self, url: str, *, synchronous: Synchronous | None = None, busy_timeout_seconds: float = 5.0
    ) -> None:
        location = parse_store_url(url)
        if location.kind != "sqlite":
            raise StoreError(f"{url!r} is not an SQLite event store URL")
        self.location = location
        self.synchronous: Synchronous = synchronous or location.synchronous
        # How long a write waits for another connection's write lock before failing.
        self.busy_timeout_seconds = busy_timeout_seconds
        self._engine: AsyncEngine | None = None
        self._writer: SqliteEventWriter | None = None
        self._checkpointer: WalCheckpointer | None = None
        self._temporary_directory: tempfile.TemporaryDirectory[str] | None = None
        self._write_lock = asyncio.Lock()
        self._encoder = msgspec.msgpack.Encoder()

    @property
    def description(self) -> str:
        return str(self.location.path) if self.location.path is not None else "a temporary SQLite database"

    @property
    def wal_checkpointer(self) -> WalCheckpointer | None:
        """The thread that checkpoints this store's WAL while it is open."""
        return self._checkpointer

    async def open(self) -> None:
        if self._engine is not None:
            return
        path = self.location.path
        if path is None:
            self._temporary_directory = tempfile.TemporaryDirectory(prefix="exo-events-")
            path = Path(self._temporary_directory.name) / "events.db"
        else:
            await asyncio.to_thread(inspect_sqlite_file, path)
        engine = create_async_engine(URL.create("sqlite+aiosqlite", database=str(path)))
        busy_timeout_ms = round(self.busy_timeout_seconds * 1000)
        _install_connection_hooks(engine, self.synchronous, busy_timeout_ms)
        writer = SqliteEventWriter(path, self.synchronous, busy_timeout_ms)
        try:
            async with self._write_engine(engine).begin() as connection:
                await connection.run_sync(upgrade_to_head)
            await writer.open()
        except (OperationalError, sqlite3.OperationalError) as error:
            # e.g. another process holds the write lock past the busy timeout, or a read-only disk.
            await self._discard(engine)
            reason = error.orig if isinstance(error, OperationalError) else error
            raise StoreError(f"cannot open event store {self.description}: {reason}") from None
        except BaseException:
            await self._discard(engine)
            raise
        self._engine, self._writer = engine, writer
        self._checkpointer = WalCheckpointer(path, self.synchronous, busy_timeout_ms)
        self._checkpointer.start()

    async def close(self) -> None:
        engine, writer, self._engine, self._writer = self._engine, self._writer, None, None
        checkpointer, self._checkpointer = self._checkpointer, None
        if engine is None:
            return
        async with self._write_lock:
            try:
                if checkpointer is not None:
                    await asyncio.to_thread(checkpointer.stop)
                if writer is not None:
                    await writer.close()
            finally:
                await self._discard(engine)

    async def _discard(self, engine: AsyncEngine) -> None:
        await engine.dispose()
        temporary, self._temporary_directory = self._temporary_directory, None
        if temporary is not None:
            temporary.cleanup()

    async def append(self, events: Sequence[IndexedEvent]) -> None:
        await self._append(events, now=False)

    async def append_now(self, events: Sequence[IndexedEvent]) -> None:
        await self._append(events, now=True)

    async def _append(self, events: Sequence[IndexedEvent], *, now: bool) -> None:
        self._require_writer()
        if not events:
            return
        encode = self._encoder.encode
        rows: list[EventRow] = []
        for indexed in events:
            payload = encode(indexed)
            rows.append(
                (
                    indexed.index,
                    indexed.term,
                    event_type_name(indexed.event),
                    payload,
                    payload_checksum(payload),
                )
            )
        async with self._write_lock:
            # Taken again under the lock: close() may have run while this call waited for it.
            writer = self._require_writer()
            rules.check_batch_continues(events, writer.last_index_now() if now else await writer.last_index())
            try:
                if now:
                    writer.insert_now(rows)
                else:
                    await writer.insert(rows)
            except sqlite3.Error as error:
                span = f"{events[0].index}..{events[-1].index}"
                raise StoreError(f"cannot write events {span} to {self.description}: {error}") from error

    async def read(self, start: int, end: int | None = None, limit: int | None = None) -> list[IndexedEvent]:
        engine = self._require_engine()
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        query = select(events_table.c.event_index, events_table.c.payload, events_table.c.checksum).where(
            events_table.c.event_index >= start
        )
        if end is not None:
            query = query.where(events_table.c.event_index < end)
        query = query.order_by(events_table.c.event_index)
        if limit is not None:
            query = query.limit(limit)
        async with engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [self._decode_event(row[0], row[1], row[2]) for row in rows]

    async def last_index(self) -> int:
        writer = self._require_writer()
        async with self._write_lock:
            return await writer.last_index()

    async def first_index(self) -> int:
        query = select(
            select(func.min(events_table.c.event_index)).scalar_subquery(),
            select(func.max(snapshots_table.c.event_index)).scalar_subquery(),
        )
        async with self._require_engine().connect() as connection:
            first_event_index, newest_snapshot_index = (await connection.execute(query)).one()
        return rules.first_index(first_event_index, newest_snapshot_index)

    async def truncate_after(self, index: int) -> None:
        writer = self._require_writer()
        rules.check_truncate_index(index)
        async with self._write_lock, self._sqlalchemy_write(writer) as connection:
            await connection.execute(delete(events_table).where(events_table.c.event_index > index))
            await connection.execute(delete(snapshots_table).where(snapshots_table.c.event_index > index))

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        writer = self._require_writer()
        rules.check_snapshot(snapshot)
        state = encode_state(snapshot.state)
        async with self._write_lock, self._sqlalchemy_write(writer) as connection:
            last_event_index = (
                await connection.execute(select(func.max(events_table.c.event_index)))
            ).scalar()
            if rules.snapshot_supersedes_events(snapshot.index, last_event_index):
                await connection.execute(delete(events_table))
            await connection.execute(
                delete(snapshots_table).where(snapshots_table.c.event_index == snapshot.index)
            )
            await connection.execute(insert(snapshots_table), {"event_index": snapshot.index, "state": state})

    async def save_commit_index(self, index: int) -> None:
        writer = self._require_writer()
        async with self._write_lock, self._sqlalchemy_write(writer) as connection:
            await connection.execute(delete(hard_state_table))
            await connection.execute(insert(hard_state_table), {"id": 1, "commit_index": index})

    async def load_commit_index(self) -> int | None:
        query = select(hard_state_table.c.commit_index).where(hard_state_table.c.id == 1)
        async with self._require_engine().connect() as connection:
            return (await connection.execute(query)).scalar()

    async def load_snapshot(self, at_or_before: int | None = None) -> Snapshot | None:
        query = select(snapshots_table.c.event_index, snapshots_table.c.state)
        if at_or_before is not None:
            query = query.where(snapshots_table.c.event_index <= at_or_before)
        query = query.order_by(snapshots_table.c.event_index.desc()).limit(1)
        async with self._require_engine().connect() as connection:
            row = (await connection.execute(query)).first()
        if row is None:
            return None
        index, data = row
        try:
            return Snapshot(index, decode_state(data))
        except DECODE_ERRORS as error:
            raise StoreError(f"snapshot {index} in {self.description} does not decode: {error}") from None

    def _decode_event(self, index: int, payload: bytes, checksum: int | None) -> IndexedEvent:
        if (problem := checksum_problem(payload, checksum)) is not None:
            raise StoreError(f"event {index} in {self.description} {problem}")
        try:
            indexed = indexed_event_decoder.decode(payload)
        except DECODE_ERRORS as error:
            raise StoreError(f"event {index} in {self.description} does not decode: {error}") from None
        if indexed.index != index:
            raise StoreError(f"row {index} in {self.description} holds event {indexed.index}")
        return indexed

    def _require_engine(self) -> AsyncEngine:
        if self._engine is None:
            raise StoreError("the event store is not open: call open() first")
        return self._engine

    def _require_writer(self) -> SqliteEventWriter:
        self._require_engine()
        assert self._writer is not None
        return self._writer

    @contextlib.asynccontextmanager
    async def _sqlalchemy_write(self, writer: SqliteEventWriter) -> AsyncIterator[AsyncConnection]:
        """A write transaction on a pooled connection (the caller holds the write lock)."""
        try:
            async with self._write_engine(self._require_engine()).begin() as connection:
                yield connection
        finally:
            writer.forget_last_index()

    @staticmethod
    def _write_engine(engine: AsyncEngine) -> AsyncEngine:
        return engine.execution_options(**{_WRITE_TRANSACTION: True})

    async def write_pragma(self, name: str) -> object:
        """A setting of the connection that writes the log, e.g. `synchronous` (2 = FULL, 1 = NORMAL)."""
        writer = self._require_writer()
        async with self._write_lock:
            return await writer.pragma(name)


def _install_connection_hooks(engine: AsyncEngine, synchronous: Synchronous, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN into our own hands (the driver's implicit BEGIN skips DDL, which would make
        # migrations non-atomic, and never takes the write lock up front).
        dbapi_connection.isolation_level = None
        apply_log_pragmas(dbapi_connection, synchronous, busy_timeout_ms)

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_WRITE_TRANSACTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
