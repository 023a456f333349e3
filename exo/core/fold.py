"""The one fold of a log: a snapshot's state, then the events after it, checked for holes.

Node start-up, truncation (exo.store.restore) and `exo-replay` (exo.replay) all fold through
`LogFold`, so a log with a hole is refused the same way everywhere instead of giving a state
that is silently wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

from exo.core.events import IndexedEvent
from exo.core.state import State, StateBuilder


class LogGapError(ValueError):
    """The events do not continue the state: `expected` is the first missing index."""

    def __init__(self, expected: int, found: int | None) -> None:
        self.detail = f"the log continues at {found}" if found is not None else "no later event is stored"
        super().__init__(f"index {expected} is missing ({self.detail})")
        self.expected = expected
        self.found = found


class LogFold:
    """Folds runs of events onto a start state (a snapshot's, or empty) in one StateBuilder."""

    def __init__(self, start_state: State | None = None) -> None:
        self._builder = StateBuilder(start_state if start_state is not None else State())

    @property
    def last_event_index(self) -> int:
        return self._builder.last_event_index

    def feed(self, events: Iterable[IndexedEvent]) -> None:
        """Apply events that continue the state exactly (LogGapError at the first that does not)."""
        builder = self._builder
        expected = builder.last_event_index + 1
        apply_event = builder.apply  # bound once: this loop is replay's speed
        for indexed in events:
            if indexed.index != expected:
                raise LogGapError(expected, indexed.index)
            apply_event(indexed)
            expected += 1

    def state(self, reach: int = 0, found: int | None = None) -> State:
        """The folded state; LogGapError when it stops short of `reach` (the index the log says it
        holds): the events after it are gone and no snapshot covers them. `found` is the next
        index stored after the fold's end, for the error's message."""
        if self._builder.last_event_index < reach:
            raise LogGapError(self._builder.last_event_index + 1, found)
        return self._builder.build()


def fold_events(events: Iterable[IndexedEvent], start_state: State | None = None) -> State:
    """`events` folded onto `start_state` (empty when None); LogGapError when they do not continue it."""
    fold = LogFold(start_state)
    fold.feed(events)
    return fold.state()
