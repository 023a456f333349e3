"""StateBuilder (the copy-on-write fold replay and catch-up use) against one `apply` per event."""

from __future__ import annotations

from bench.replay_bench import realistic_events
from exo.core.events import Event, IndexedEvent
from exo.core.state import State, StateBuilder, apply, encode_state

# Every event type, instance churn and nodes timing out with instances on them (see realistic_events).
LOG = list(realistic_events(20_000, seed=11))


def fold_one_by_one(events: list[IndexedEvent], state: State | None = None) -> State:
    state = state if state is not None else State()
    for indexed in events:
        state = apply(state, indexed)
    return state


def test_the_log_used_here_has_every_event_type() -> None:
    assert {type(indexed.event) for indexed in LOG} == set(Event.__args__)


def test_a_builder_folds_a_log_to_the_state_apply_builds_one_event_at_a_time() -> None:
    builder = StateBuilder(State())
    for indexed in LOG:
        builder.apply(indexed)
    assert builder.build() == fold_one_by_one(LOG)


def test_a_builder_never_changes_the_state_it_started_from() -> None:
    start = fold_one_by_one(LOG[:5_000])
    start_bytes = encode_state(start)
    builder = StateBuilder(start)
    for indexed in LOG[5_000:]:
        builder.apply(indexed)
    assert builder.build() == fold_one_by_one(LOG)
    assert encode_state(start) == start_bytes


def test_a_built_state_is_not_changed_by_what_the_builder_folds_after_it() -> None:
    builder = StateBuilder(State())
    built: list[tuple[State, bytes]] = []
    for batch in _batched(LOG, 3_000):
        for indexed in batch:
            builder.apply(indexed)
        state = builder.build()
        built.append((state, encode_state(state)))
    for state, state_bytes in built:
        assert encode_state(state) == state_bytes
    assert built[-1][0] == fold_one_by_one(LOG)


def _batched(events: list[IndexedEvent], size: int) -> list[list[IndexedEvent]]:
    return [events[start : start + size] for start in range(0, len(events), size)]
