"""The master's de-duplication of origins' local events before Raft appends them, sans-IO."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from exo.core.events import Event, IndexedEvent, InstanceCreated, InstanceDeleted, RunnerStatusUpdated
from exo.core.messages import LocalEvent


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

    def observe_log(self, entries: Iterable[IndexedEvent]) -> None:
        """Entries already in the log but not applied yet (a new master's uncommitted tail): their
        origins' sequences are not new, and their instances exist."""
        for entry in entries:
            self.high_water.observe(entry)
            self._track(entry.event)

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
