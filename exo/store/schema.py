"""The tables of the event store, as the code reads and writes them (migrations create them).

Kept in portable SQLAlchemy Core so a PostgreSQL store can reuse them. `event_index` is
`INTEGER PRIMARY KEY` on SQLite, which makes it the rowid: index-ordered scans are the table order.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, LargeBinary, MetaData, String, Table

# A tag in the SQLite header (PRAGMA application_id) that marks a file as an exo event store: "exo\0".
SQLITE_APPLICATION_ID = 0x65786F00

INDEX_TYPE = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

# One row per indexed event; `payload` is the msgpack of the whole IndexedEvent. `term` and
# `event_type` are copies kept for queries and tools (counts by type) without decoding.
events_table = Table(
    "events",
    metadata,
    Column("event_index", INDEX_TYPE, primary_key=True, autoincrement=False),
    Column("term", BigInteger, nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("payload", LargeBinary, nullable=False),
)

# One row per snapshot; `state` is the msgpack of exo.core.state.State after applying `event_index`.
snapshots_table = Table(
    "snapshots",
    metadata,
    Column("event_index", INDEX_TYPE, primary_key=True, autoincrement=False),
    Column("state", LargeBinary, nullable=False),
)
