"""Read an SQLite event log without ever writing to it: for exo-replay and other offline tools.

The file is checked first (exists, is SQLite, is an exo store at this code's schema) and then
opened with `mode=ro`, so no reader can create, migrate or modify a log.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, func, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import DatabaseError
from sqlalchemy.pool import NullPool

from exo.core.decoding import DECODE_ERRORS
from exo.core.events import IndexedEvent, indexed_event_decoder
from exo.core.state import decode_state
from exo.store.base import Snapshot, StoreError
from exo.store.checksum import checksum_problem, payload_checksum
from exo.store.location import parse_store_url
from exo.store.migrate import head_revision
from exo.store.schema import events_table, hard_state_table, snapshots_table
from exo.store.sqlite_file import inspect_sqlite_file

READ_BATCH_ROWS = 8192


class EventDecodeError(StoreError):
    """One stored event does not decode; `index` names it."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(f"event {index}: {detail}")
        self.index = index
        self.detail = detail


class LogReader:
    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = path
        self._engine = engine

    @classmethod
    def open(cls, url_or_path: str) -> LogReader:
        location = parse_store_url(url_or_path)
        if location.kind != "sqlite" or location.path is None:
            raise StoreError(f"{url_or_path!r} is not an event log on disk: nothing to read")
        path = location.path
        if not path.exists():
            raise StoreError(f"{path}: no such file")
        inspection = inspect_sqlite_file(path)
        if inspection.status != "exo":
            raise StoreError(f"{path} is not an exo event store (no exo schema in it)")
        if inspection.revision != head_revision():
            raise StoreError(
                f"{path} has the older schema revision {inspection.revision}: start an exo node on it once "
                f"to upgrade it to {head_revision()} (readers never modify a log)"
            )
        url = URL.create(
            "sqlite+pysqlite",
            database=f"file:{quote(str(path.resolve()))}",
            query={"mode": "ro", "uri": "true"},
        )
        return cls(path, create_engine(url, poolclass=NullPool))

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def index_range(self) -> tuple[int, int, int]:
        """(number of events, lowest event index, highest event index); zeros when there are none."""
        query = select(
            func.count(), func.min(events_table.c.event_index), func.max(events_table.c.event_index)
        ).select_from(events_table)
        with self._connect() as connection:
            count, lowest, highest = connection.execute(query).one()
        return count, lowest or 0, highest or 0

    def last_index(self) -> int:
        """The highest index stored (events or snapshot), 0 when empty."""
        query = select(
            select(func.max(events_table.c.event_index)).scalar_subquery(),
            select(func.max(snapshots_table.c.event_index)).scalar_subquery(),
        )
        with self._connect() as connection:
            last_event_index, newest_snapshot_index = connection.execute(query).one()
        return max(last_event_index or 0, newest_snapshot_index or 0)

    def commit_index(self) -> int | None:
        """The node's recorded commit index; None for a log written before quorum commits (all of it
        counts as committed)."""
        query = select(hard_state_table.c.commit_index).where(hard_state_table.c.id == 1)
        with self._connect() as connection:
            return connection.execute(query).scalar()

    def next_event_index(self, after: int) -> int | None:
        query = select(func.min(events_table.c.event_index)).where(events_table.c.event_index > after)
        with self._connect() as connection:
            return connection.execute(query).scalar()

    def snapshot_indices(self) -> list[int]:
        query = select(snapshots_table.c.event_index).order_by(snapshots_table.c.event_index)
        with self._connect() as connection:
            return list(connection.execute(query).scalars())

    def load_snapshot(self, at_or_before: int | None = None) -> Snapshot | None:
        query = select(snapshots_table.c.event_index, snapshots_table.c.state)
        if at_or_before is not None:
            query = query.where(snapshots_table.c.event_index <= at_or_before)
        query = query.order_by(snapshots_table.c.event_index.desc()).limit(1)
        with self._connect() as connection:
            row = connection.execute(query).first()
        if row is None:
            return None
        index, data = row
        try:
            return Snapshot(index, decode_state(data))
        except DECODE_ERRORS as error:
            raise StoreError(f"snapshot {index} in {self.path} does not decode: {error}") from None

    def counts_by_type(self, until: int | None = None) -> dict[str, int]:
        query = select(events_table.c.event_type, func.count()).group_by(events_table.c.event_type)
        if until is not None:
            query = query.where(events_table.c.event_index <= until)
        with self._connect() as connection:
            return {event_type: count for event_type, count in connection.execute(query)}

    def rows(self, start: int = 0, until: int | None = None) -> Iterator[list[tuple[int, bytes, int]]]:
        """Batches of raw (index, payload, checksum) rows with start <= index <= until, in index order."""
        query = select(events_table.c.event_index, events_table.c.payload, events_table.c.checksum).where(
            events_table.c.event_index >= start
        )
        if until is not None:
            query = query.where(events_table.c.event_index <= until)
        query = query.order_by(events_table.c.event_index)
        sql = str(query.compile(dialect=self._engine.dialect, compile_kwargs={"literal_binds": True}))
        with self._connect() as connection:
            # The bulk read goes straight to the DBAPI cursor: SQLAlchemy's Result costs about as
            # much per row as the read itself, and replay speed is this loop.
            cursor = connection.connection.cursor()
            try:
                cursor.execute(sql)
                while batch := cursor.fetchmany(READ_BATCH_ROWS):
                    yield batch  # pyright: ignore[reportReturnType] - DBAPI rows are (int, bytes, int) tuples
            except self._engine.dialect.loaded_dbapi.DatabaseError as error:
                raise StoreError(f"cannot read {self.path}: {error}") from None
            finally:
                cursor.close()

    def events(self, start: int = 0, until: int | None = None) -> Iterator[IndexedEvent]:
        """Decoded events, in index order; EventDecodeError names the first one that fails its
        checksum or does not decode."""
        decode = indexed_event_decoder.decode
        crc32c = payload_checksum
        for batch in self.rows(start, until):
            index = 0
            try:
                for index, payload, checksum in batch:
                    if crc32c(payload) != checksum:
                        raise EventDecodeError(index, checksum_problem(payload, checksum) or "bad checksum")
                    indexed = decode(payload)
                    if indexed.index != index:
                        raise EventDecodeError(index, f"the row holds event {indexed.index}")
                    yield indexed
            except DECODE_ERRORS as error:
                raise EventDecodeError(index, f"does not decode ({error})") from None

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A read-only connection; a database error while reading (damage the open-time check did
        not see, e.g. a file changed under us) becomes a StoreError."""
        try:
            with self._engine.connect() as connection:
                yield connection
        except DatabaseError as error:
            raise StoreError(f"cannot read {self.path}: {error.orig}") from None
