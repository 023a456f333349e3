"""Event stores: the indexed log a node applied, plus snapshots. `open_store(url)` picks one."""

from __future__ import annotations

from exo.store.base import EventStore, Snapshot, StoreError
from exo.store.location import parse_store_url
from exo.store.memory import InMemoryEventStore
from exo.store.sqlite import SqliteEventStore

__all__ = ["EventStore", "InMemoryEventStore", "Snapshot", "SqliteEventStore", "StoreError", "open_store"]


def open_store(url: str) -> EventStore:
    """The store for `url` (not yet opened: call `await store.open()`).

    `sqlite+aiosqlite:///PATH` or a plain path: SqliteEventStore; `memory://`: InMemoryEventStore.
    Raises StoreError for any other scheme.
    """
    location = parse_store_url(url)
    if location.kind == "memory":
        return InMemoryEventStore()
    return SqliteEventStore(url)
