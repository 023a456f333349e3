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
# `event_type` are copies kept for queries and tools (counts by type) without decoding; `checksum`
# is the CRC32C of `payload` (exo/store/checksum.py), checked on every read.
events_table = Table(
    "events",
    metadata,
    Column("event_index", INDEX_TYPE, primary_key=True, autoincrement=False),
    Column("term", BigInteger, nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("checksum", BigInteger, nullable=False, server_default="0"),
)

# One row per snapshot; `state` is the msgpack of exo.core.state.State after applying `event_index`.
snapshots_table = Table(
    "snapshots",
    metadata,
    Column("event_index", INDEX_TYPE, primary_key=True, autoincrement=False),
    Column("state", LargeBinary, nullable=False),
)

# Raft's hard state (at most one row, `id` = 1): the highest index known committed, written lazily
# (a lower value is safe: the master commits the rest again). No row: every stored event counts as
# committed (a log written before quorum commits).
hard_state_table = Table(
    "hard_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("commit_index", BigInteger, nullable=False),
)
