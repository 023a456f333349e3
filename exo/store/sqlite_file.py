"""Look at an SQLite file before exo writes to it, and refuse anything that is not ours.

Every check here opens the file read-only, so a refusal leaves its bytes exactly as they were.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from exo.store.base import StoreError
from exo.store.migrate import head_revision, known_revisions
from exo.store.schema import SQLITE_APPLICATION_ID

SQLITE_HEADER = b"SQLite format 3\x00"

FileStatus = Literal["absent", "new", "exo"]


@dataclass(frozen=True)
class FileInspection:
    status: FileStatus
    # The Alembic revision of an exo store; None when the file is absent or new.
    revision: str | None = None


def read_only_uri(path: Path) -> str:
    """An SQLite URI that can never create or write the file."""
    return f"file:{quote(str(path.resolve()))}?mode=ro"


def inspect_sqlite_file(path: Path) -> FileInspection:
    """Say whether `path` is absent, a new (empty) database, or an exo store at a known revision.

    Raises StoreError for anything else: not SQLite, corrupt or truncated, another program's
    database, or an exo store written by a newer exo (unknown revision).
    """
    if not path.exists():
        if not path.parent.is_dir():
            raise StoreError(f"cannot create event store {path}: directory {path.parent} does not exist")
        return FileInspection("absent")
    if not path.is_file():
        raise StoreError(f"event store {path} is not a regular file")
    with path.open("rb") as file:
        header = file.read(100)
    if not header:
        # SQLite treats a zero-length file as an empty database.
        return FileInspection("new")
    if not header.startswith(SQLITE_HEADER):
        raise StoreError(
            f"{path} is not an SQLite database (no SQLite header): refusing to use it as an event store"
        )
    if len(header) < 100:
        raise StoreError(f"{path} is corrupt: truncated inside its SQLite header ({len(header)} bytes)")
    try:
        connection = sqlite3.connect(read_only_uri(path), uri=True)
    except sqlite3.Error as error:
        raise StoreError(f"cannot open {path} read-only: {error}") from None
    try:
        return _inspect_database(path, connection)
    except sqlite3.DatabaseError as error:
        raise StoreError(f"{path} is corrupt: {error}") from None
    finally:
        connection.close()


def _inspect_database(path: Path, connection: sqlite3.Connection) -> FileInspection:
    # SQLite itself refuses a file shorter than its header says; quick_check reads every page
    # (about 0.2 s per million events from a warm cache) and catches a damaged page in the middle.
    problems = [row[0] for row in connection.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise StoreError(f"{path} is corrupt: {'; '.join(problems)}")
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    tables = {
        row[0]
        for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not row[0].startswith("sqlite_")
    }
    if application_id not in (0, SQLITE_APPLICATION_ID):
        raise StoreError(
            f"{path} belongs to another program (SQLite application_id {application_id:#x}): "
            "refusing to use it as an event store"
        )
    if "alembic_version" not in tables:
        if tables:
            raise StoreError(
                f"{path} is not an exo event store (it has tables {', '.join(sorted(tables))} "
                "and no exo schema revision): refusing to touch it"
            )
        return FileInspection("new")
    revisions = [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
    if len(revisions) != 1:
        raise StoreError(f"{path} has {len(revisions)} schema revisions recorded, expected one: refusing it")
    revision = revisions[0]
    if revision not in known_revisions():
        if revision.startswith("exo_"):
            raise StoreError(
                f"{path} has schema revision {revision}, newer than this exo knows "
                f"(up to {head_revision()}): upgrade exo to use it"
            )
        raise StoreError(
            f"{path} is not an exo event store (schema revision {revision!r} is not exo's): "
            "refusing to touch it"
        )
    return FileInspection("exo", revision)
