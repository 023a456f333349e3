"""Sequencing (master) and in-order delivery with gap detection (every node), sans-IO."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from exo.core.events import Event, IndexedEvent, InstanceCreated, InstanceDeleted, RunnerStatusUpdated
from exo.core.messages import LocalEvent

# Out-of-order events held while a gap is being fetched; past this the newest are dropped and
# fetched again later (bounded memory beats buffering an unbounded burst).
MAX_BUFFERED_EVENTS = 200_000
GAP_RETRY_INITIAL = 0.05
GAP_RETRY_MAX = 1.0


class OriginHighWater:
    """The local sequences applied per origin node, so a resent local event is dropped.

    Sequences from one origin rise; a resend can fill a hole below the highest seen (an earlier
    batch lost at a full queue), so small holes are remembered until they are filled.
    """

    MAX_HOLE = 4096

    def __init__(self) -> None:
        self._highest: dict[str, int] = {}
        self._holes: dict[str, set[int]] = {}

    def observe(self, event: IndexedEvent) -> None:
        self.record(event.origin_node_id, event.origin_sequence)

    def record(self, origin: str, sequence: int) -> None:
        if sequence < 0:
            return
        highest = self._highest.get(origin, -1)
        if sequence > highest:
            if highest >= 0 and 1 < sequence - highest <= self.MAX_HOLE:
                self._holes.setdefault(origin, set()).update(range(highest + 1, sequence))
            self._highest[origin] = sequence
        else:
            holes = self._holes.get(origin)
            if holes is not None:
                holes.discard(sequence)

    def is_new(self, origin: str, sequence: int) -> bool:
        if sequence > self._highest.get(origin, -1):
            return True
        holes = self._holes.get(origin)
        return holes is not None and sequence in holes

    def copy(self) -> OriginHighWater:
        other = OriginHighWater()
        other._highest = dict(self._highest)
        other._holes = {origin: set(holes) for origin, holes in self._holes.items()}
        return other


class Sequencer:
    """Assigns the next indices, in the master's term, to local events not seen before.

    It knows which instances exist as of the last index it handed out (`instances`, seeded from the
    applied state and moved by every event it sequences), so a runner's status that arrives after
    its instance was deleted (a runner stopping, a load finishing late) is dropped instead of
    written to the log: it would describe nothing.
    """

    def __init__(
        self,
        node_id: str,
        term: int,
        last_index: int,
        high_water: OriginHighWater,
        instances: Iterable[str] = (),
    ) -> None:
        self.node_id = node_id
        self.term = term
        self.next_index = last_index + 1
        self.high_water = high_water
        self.instances = set(instances)
        self.stale_statuses_dropped = 0

    def rewind(self, last_index: int, high_water: OriginHighWater, instances: Iterable[str]) -> None:
        """Back to the durable log's end after a failed commit: its indices are handed out again."""
        self.next_index = last_index + 1
        self.high_water = high_water
        self.instances = set(instances)

    def sequence(self, origin: str, local_events: Iterable[LocalEvent]) -> list[IndexedEvent]:
        indexed: list[IndexedEvent] = []
        for local in local_events:
            if not self.high_water.is_new(origin, local.sequence):
                continue
            if isinstance(local.event, RunnerStatusUpdated) and local.event.instance_id not in self.instances:
                self.high_water.record(origin, local.sequence)  # seen: a resend is dropped too
                self.stale_statuses_dropped += 1
                continue
            event = IndexedEvent(self.next_index, self.term, origin, local.sequence, local.event)
            self.high_water.observe(event)
            self._track(local.event)
            self.next_index += 1
            indexed.append(event)
        return indexed

    def sequence_own(self, events: Sequence[Event]) -> list[IndexedEvent]:
        """Events the master itself originates (elections, liveness, placement)."""
        indexed: list[IndexedEvent] = []
        for event in events:
            indexed.append(IndexedEvent(self.next_index, self.term, self.node_id, -1, event))
            self._track(event)
            self.next_index += 1
        return indexed

    def _track(self, event: Event) -> None:
        if isinstance(event, InstanceCreated):
            self.instances.add(event.instance_id)
        elif isinstance(event, InstanceDeleted):
            self.instances.discard(event.instance_id)


@dataclass(frozen=True)
class GapRequest:
    """Ask for events with index in (since, until]."""

    since: int
    until: int


class EventOrderer:
    """Releases events strictly in index order; detects gaps and duplicates.

    `receive` takes events in any order and returns the ones now contiguous with what was applied.
    `gap(now)` says which range to fetch, with capped exponential backoff between asks.
    """

    def __init__(self, last_applied: int) -> None:
        self.last_applied = last_applied
        self._pending: dict[int, IndexedEvent] = {}
        self.duplicates = 0
        self.overflowed = 0
        self._next_ask_at = 0.0
        self._retry_delay = GAP_RETRY_INITIAL

    def receive(self, events: Iterable[IndexedEvent]) -> list[IndexedEvent]:
        if not self._pending and isinstance(events, list):
            continuing = self._continuing(events)
            if continuing is not None:
                return continuing
        for event in events:
            if event.index <= self.last_applied or event.index in self._pending:
                self.duplicates += 1
            elif len(self._pending) >= MAX_BUFFERED_EVENTS:
                self.overflowed += 1
            else:
                self._pending[event.index] = event
        ready: list[IndexedEvent] = []
        next_index = self.last_applied + 1
        while (event := self._pending.pop(next_index, None)) is not None:
            ready.append(event)
            next_index += 1
        self.last_applied = next_index - 1
        if ready:
            self._retry_delay = GAP_RETRY_INITIAL
            self._next_ask_at = 0.0
        return ready

    def _continuing(self, events: list[IndexedEvent]) -> list[IndexedEvent] | None:
        """The usual batch from the master continues the log exactly: release it without buffering."""
        first = self.last_applied + 1
        for position, event in enumerate(events):
            if event.index != first + position:
                return None
        if events:
            self.last_applied = events[-1].index
            self._retry_delay = GAP_RETRY_INITIAL
            self._next_ask_at = 0.0
        return list(events)

    def reset(self, last_applied: int) -> None:
        """Start over from `last_applied` (after a snapshot or a truncated tail)."""
        self.last_applied = last_applied
        self._pending = {index: event for index, event in self._pending.items() if index > last_applied}
        self._retry_delay = GAP_RETRY_INITIAL
        self._next_ask_at = 0.0

    @property
    def buffered(self) -> int:
        return len(self._pending)

    @property
    def has_gap(self) -> bool:
        return bool(self._pending)

    def gap(self, now: float, known_last_index: int = 0) -> GapRequest | None:
        """The range to fetch now, or None (no gap, or backing off from the last ask).

        `known_last_index` is the highest index the master said exists (from heartbeats), so a
        node that missed the newest events without receiving anything after them still asks.
        """
        if self._pending:
            until = min(self._pending) - 1
        elif known_last_index > self.last_applied:
            until = known_last_index
        else:
            return None
        if now < self._next_ask_at:
            return None
        self._next_ask_at = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, GAP_RETRY_MAX)
        return GapRequest(self.last_applied, until)
