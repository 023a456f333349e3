"""Where an event store lives: parse `--event-store` values into a location, or say clearly why not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from exo.store.base import StoreError

Synchronous = Literal["full", "normal"]
StoreKind = Literal["sqlite", "memory"]

SQLITE_SCHEMES = ("sqlite", "sqlite+aiosqlite", "sqlite+pysqlite")
SUPPORTED_FORMS = "sqlite+aiosqlite:///PATH, memory://, or a plain file path"


@dataclass(frozen=True)
class StoreLocation:
    kind: StoreKind
    # None for an SQLite database held in memory (`sqlite+aiosqlite://`).
    path: Path | None = None
    synchronous: Synchronous = "full"


def parse_store_url(url: str) -> StoreLocation:
    """`sqlite+aiosqlite:///PATH` (or `sqlite:///PATH`), `memory://`, or a plain path (SQLite)."""
    if not url.strip():
        raise StoreError(f"empty event store URL (use {SUPPORTED_FORMS})")
    if "://" not in url:
        return StoreLocation("sqlite", Path(url).expanduser())
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        if url.lower() != "memory://":
            raise StoreError(
                f"the in-memory event store takes no path or options: use 'memory://', not {url!r}"
            )
        return StoreLocation("memory")
    if scheme not in SQLITE_SCHEMES:
        raise StoreError(f"unsupported event store URL scheme {scheme!r} in {url!r} (use {SUPPORTED_FORMS})")
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise StoreError(f"malformed event store URL {url!r}: {error}") from None
    if parsed.host or parsed.port or parsed.username or parsed.password:
        raise StoreError(f"an SQLite URL names a file, not a host: {url!r} (use sqlite+aiosqlite:///PATH)")
    synchronous = _synchronous_option(url, dict(parsed.query))
    database = parsed.database
    if not database or database == ":memory:":
        return StoreLocation("sqlite", None, synchronous)
    return StoreLocation("sqlite", Path(database).expanduser(), synchronous)


def _synchronous_option(url: str, query: dict[str, str | tuple[str, ...]]) -> Synchronous:
    unknown = sorted(set(query) - {"synchronous"})
    if unknown:
        raise StoreError(f"unsupported option(s) {', '.join(unknown)} in {url!r} (known: synchronous)")
    value = query.get("synchronous", "full")
    if isinstance(value, tuple) or value.lower() not in get_args(Synchronous):
        raise StoreError(f"synchronous must be 'full' or 'normal' in {url!r}, not {value!r}")
    return "full" if value.lower() == "full" else "normal"
