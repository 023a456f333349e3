"""The event store interface: the indexed log a node applied, plus snapshots of the state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from exo.core.events import IndexedEvent
from exo.core.state import State


class StoreError(Exception):
    """The store cannot be used as it is (corrupt, foreign, newer schema). The message says why."""


class Snapshot:
    __slots__ = ("index", "state")

    def __init__(self, index: int, state: State) -> None:
        self.index = index
        self.state = state


class EventStore(Protocol):
    async def open(self) -> None:
        """Create or upgrade the schema; refuse (StoreError) a store that is not ours or is newer."""
        ...

    async def close(self) -> None: ...

    async def append(self, events: Sequence[IndexedEvent]) -> None:
        """Make a batch durable in one commit. Indices must continue the log without a gap."""
        ...

    async def append_now(self, events: Sequence[IndexedEvent]) -> None:
        """`append` without leaving the caller's thread: it blocks the event loop for the commit.
        For a caller whose next step waits for the commit anyway (the master's sequencer)."""
        ...

    async def read(self, start: int, end: int | None = None, limit: int | None = None) -> list[IndexedEvent]:
        """Events with `start <= index` (and `index < end` when given), in index order."""
        ...

    async def last_index(self) -> int:
        """The highest index stored (events or snapshot), 0 when empty."""
        ...

    async def first_index(self) -> int:
        """The lowest event index stored, or last snapshot index + 1 when events before it are gone."""
        ...

    async def truncate_after(self, index: int) -> None:
        """Drop events above `index` (a divergent tail after a partition heals)."""
        ...

    async def save_snapshot(self, snapshot: Snapshot) -> None: ...

    async def save_commit_index(self, index: int) -> None:
        """Record that the log is committed up to `index` (durably; a lower value than the truth is safe)."""
        ...

    async def load_commit_index(self) -> int | None:
        """The recorded commit index; None when none was recorded (every stored event is committed)."""
        ...

    async def load_snapshot(self, at_or_before: int | None = None) -> Snapshot | None:
        """The newest snapshot with index <= `at_or_before` (any when None)."""
        ...
