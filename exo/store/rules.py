"""The rules every event store enforces, as plain functions (no I/O), shared by all stores.

The events a store holds are always one contiguous run of indices; a snapshot may stand before
that run (the run then starts right after it).
"""

from __future__ import annotations

from collections.abc import Sequence

from exo.core.events import IndexedEvent
from exo.store.base import Snapshot


def check_batch_continues(events: Sequence[IndexedEvent], last_index: int) -> None:
    """Raise ValueError unless the batch's indices are last_index+1, last_index+2, ..."""
    for position, indexed in enumerate(events):
        expected = last_index + 1 + position
        if indexed.index != expected:
            raise ValueError(
                f"event index {indexed.index} at position {position} of the batch does not continue the log: "
                f"expected {expected} (the store ends at {last_index}); nothing was written"
            )


def check_snapshot(snapshot: Snapshot) -> None:
    if snapshot.index < 0:
        raise ValueError(f"snapshot index must be >= 0, not {snapshot.index}")
    if snapshot.state.last_event_index != snapshot.index:
        raise ValueError(
            f"snapshot index {snapshot.index} does not match its state's last_event_index "
            f"{snapshot.state.last_event_index}"
        )


def check_truncate_index(index: int) -> None:
    if index < 0:
        raise ValueError(f"truncate_after needs an index >= 0, not {index}")


def snapshot_supersedes_events(snapshot_index: int, last_event_index: int | None) -> bool:
    """A snapshot past the end of the stored events leaves a hole after them: they must go.

    (A node that catches up from a master's snapshot continues from there; its older events can
    no longer be extended into one contiguous run.)
    """
    return last_event_index is not None and snapshot_index > last_event_index


def first_index(first_event_index: int | None, newest_snapshot_index: int | None) -> int:
    if first_event_index is not None:
        return first_event_index
    if newest_snapshot_index is not None:
        return newest_snapshot_index + 1
    return 1
