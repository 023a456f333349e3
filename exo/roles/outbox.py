"""A node's local events on their way to the master, sans-IO: kept until seen applied, resent when stale.

An event is stale RESEND_AFTER_SECONDS after it was sent, but only resent when the master skipped it
(a later event of this node's is already applied: it was lost on the way) or when none of this
node's events has been applied for RESEND_AFTER_SECONDS (the master is gone or stuck). A backlog the
master is working through is left alone: resending it only made the backlog longer.

Sequences rise across restarts (they start from the clock in microseconds), so the master's
per-origin high water never mistakes a restarted node's events for old ones.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass

from exo.core.events import Event, IndexedEvent, InstanceDeleted, RunnerStatusUpdated
from exo.core.messages import LocalEvent

RESEND_AFTER_SECONDS = 1.0
MAX_PENDING_LOCAL_EVENTS = 100_000
MAX_LOCAL_BATCH = 1024


@dataclass
class PendingLocal:
    event: LocalEvent
    sent_at: float


class Outbox:
    def __init__(self, node_id: str, first_sequence: int | None = None) -> None:
        self.node_id = node_id
        self._sequence = time.time_ns() // 1000 if first_sequence is None else first_sequence
        # Oldest send first (a resend moves an event to the end), so the stale scan stops early.
        self._pending: OrderedDict[int, PendingLocal] = OrderedDict()
        self.resent = 0
        self._highest_applied = 0  # this node's highest sequence seen in the log
        self._progress_at: float | None = None  # when one of this node's events was last seen applied

    @property
    def last_sequence(self) -> int:
        return self._sequence

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, events: Sequence[Event], now: float) -> list[list[LocalEvent]]:
        """Record new events; returns the batches to send now. OverflowError past the bound."""
        if len(self._pending) + len(events) > MAX_PENDING_LOCAL_EVENTS:
            raise OverflowError("too many local events waiting for the master")
        added: list[LocalEvent] = []
        for event in events:
            self._sequence += 1
            local = LocalEvent(self._sequence, event)
            self._pending[local.sequence] = PendingLocal(local, now)
            added.append(local)
        return _batches(added)

    def applied(
        self, events: Sequence[IndexedEvent], now: float, instances: Container[str] | None = None
    ) -> None:
        """Forget this node's events that the log now holds, and, once `events` delete an instance,
        the runner statuses of instances no longer in `instances` (the applied state's): the master
        drops those as describing nothing, so they would otherwise wait here forever."""
        if not self._pending:
            return
        deleted = False
        for event in events:
            deleted = deleted or isinstance(event.event, InstanceDeleted)
            if event.origin_node_id == self.node_id and self._pending.pop(event.origin_sequence, None):
                self._highest_applied = max(self._highest_applied, event.origin_sequence)
                self._progress_at = now
        if deleted and instances is not None:
            for sequence, pending in list(self._pending.items()):
                status = pending.event.event
                if isinstance(status, RunnerStatusUpdated) and status.instance_id not in instances:
                    del self._pending[sequence]

    def stale(self, now: float) -> list[list[LocalEvent]]:
        """Batches of events sent more than RESEND_AFTER_SECONDS ago, still not applied, and skipped
        by the master or held up by a master that applies none of them (module docstring)."""
        stalled = self._progress_at is None or now - self._progress_at > RESEND_AFTER_SECONDS
        stale: list[PendingLocal] = []
        for pending in self._pending.values():
            if now - pending.sent_at <= RESEND_AFTER_SECONDS:
                break
            if stalled or pending.event.sequence < self._highest_applied:
                stale.append(pending)
        for pending in stale:
            pending.sent_at = now
            self._pending.move_to_end(pending.event.sequence)
        self.resent += len(stale)
        return _batches(sorted((pending.event for pending in stale), key=lambda local: local.sequence))

    def everything(self, now: float) -> list[list[LocalEvent]]:
        """Every pending event, in order (a new master knows none of them)."""
        for pending in self._pending.values():
            pending.sent_at = now
        return _batches(
            sorted((pending.event for pending in self._pending.values()), key=lambda e: e.sequence)
        )


def _batches(events: list[LocalEvent]) -> list[list[LocalEvent]]:
    return [events[start : start + MAX_LOCAL_BATCH] for start in range(0, len(events), MAX_LOCAL_BATCH)]
