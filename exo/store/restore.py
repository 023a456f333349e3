"""A state from an event store: its newest snapshot (at or before an index), then the events after
it, through the core's one fold. Node start-up and truncation use it; `exo-replay` folds the same
way from its read-only reader."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from exo.core.events import IndexedEvent
from exo.core.fold import LogFold
from exo.core.state import State
from exo.store.base import EventStore

RESTORE_PAGE_EVENTS = 50_000


async def restore_state(
    store: EventStore,
    until: int | None = None,
    on_events: Callable[[Sequence[IndexedEvent]], None] | None = None,
) -> State:
    """The state after index `until` (the whole log when None). `on_events` sees every folded page
    (the replica learns its origins' high water in the same pass). LogGapError when the stored
    events have a hole, or stop short of what the store says it holds."""
    snapshot = await store.load_snapshot(until)
    fold = LogFold(snapshot.state if snapshot is not None else State())
    end = None if until is None else until + 1
    while True:
        page = await store.read(fold.last_event_index + 1, end, limit=RESTORE_PAGE_EVENTS)
        if not page:
            break
        fold.feed(page)
        if on_events is not None:
            on_events(page)
    stored = await store.last_index()
    reach = stored if until is None else min(until, stored)
    if fold.last_event_index < reach:
        later = await store.read(fold.last_event_index + 1, reach + 1, limit=1)
        return fold.state(reach, later[0].index if later else None)
    return fold.state()
