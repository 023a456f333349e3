"""The local-event outbox: batches, resend of stale events in order, forgetting applied ones, and
no resend of a backlog the master is working through."""

from __future__ import annotations

import pytest

from exo.core.events import IndexedEvent, InstanceDeleted, NodeLabelled, RunnerStatusUpdated
from exo.roles.outbox import MAX_LOCAL_BATCH, MAX_PENDING_LOCAL_EVENTS, RESEND_AFTER_SECONDS, Outbox


def labels(count: int) -> list[NodeLabelled]:
    return [NodeLabelled("n", "k", str(i)) for i in range(count)]


def test_new_events_get_rising_sequences_in_bounded_batches() -> None:
    outbox = Outbox("a", first_sequence=100)
    batches = outbox.add(labels(MAX_LOCAL_BATCH + 5), now=0.0)
    assert [len(batch) for batch in batches] == [MAX_LOCAL_BATCH, 5]
    sequences = [local.sequence for batch in batches for local in batch]
    assert sequences == list(range(101, 101 + MAX_LOCAL_BATCH + 5))
    assert len(outbox) == MAX_LOCAL_BATCH + 5


def test_stale_events_are_resent_once_per_period_oldest_first() -> None:
    outbox = Outbox("a", first_sequence=0)
    outbox.add(labels(3), now=0.0)
    outbox.add(labels(2), now=0.5)
    assert outbox.stale(now=RESEND_AFTER_SECONDS) == []
    first = outbox.stale(now=RESEND_AFTER_SECONDS + 0.1)
    assert [local.sequence for batch in first for local in batch] == [1, 2, 3]
    assert outbox.stale(now=RESEND_AFTER_SECONDS + 0.2) == []
    second = outbox.stale(now=RESEND_AFTER_SECONDS + 0.6)
    assert [local.sequence for batch in second for local in batch] == [4, 5]
    assert outbox.resent == 5


def test_applied_events_are_forgotten_only_for_this_origin() -> None:
    outbox = Outbox("a", first_sequence=0)
    outbox.add(labels(3), now=0.0)
    outbox.applied(
        [
            IndexedEvent(1, 1, "a", 1, NodeLabelled("n", "k", "0")),
            IndexedEvent(2, 1, "b", 2, NodeLabelled("n", "k", "1")),
        ],
        now=0.1,
    )
    everything = outbox.everything(now=5.0)
    assert [local.sequence for batch in everything for local in batch] == [2, 3]


def test_the_outbox_is_bounded() -> None:
    outbox = Outbox("a")
    outbox.add(labels(MAX_PENDING_LOCAL_EVENTS - 1), now=0.0)
    with pytest.raises(OverflowError):
        outbox.add(labels(2), now=0.0)
    assert len(outbox) == MAX_PENDING_LOCAL_EVENTS - 1


def applied_as(sequences: list[int]) -> list[IndexedEvent]:
    return [IndexedEvent(s, 1, "a", s, NodeLabelled("n", "k", str(s))) for s in sequences]


def resent(outbox: Outbox, now: float) -> list[int]:
    return [local.sequence for batch in outbox.stale(now) for local in batch]


def test_a_backlog_being_applied_is_not_resent_but_a_skipped_event_is() -> None:
    outbox = Outbox("a", first_sequence=0)
    outbox.add(labels(6), now=0.0)
    outbox.applied(applied_as([1, 2]), now=1.05)
    assert resent(outbox, now=1.1) == []  # 3..6 are on their way: the master is applying ours
    outbox.applied(applied_as([4]), now=1.2)
    assert resent(outbox, now=1.3) == [3]  # 4 is in the log, so 3 was lost on the way
    assert resent(outbox, now=1.4) == []
    # No progress for a while (the master is gone): everything old enough goes again.
    assert resent(outbox, now=2.35) == [3, 5, 6]
    assert outbox.resent == 4


def test_statuses_of_an_instance_deleted_in_the_log_are_forgotten() -> None:
    """The master drops a runner status for a deleted instance; the outbox must not resend it
    forever. It forgets such statuses once it sees a deletion, and keeps everything else."""
    outbox = Outbox("a", first_sequence=0)
    outbox.add(
        [
            RunnerStatusUpdated("i-1", "a", "failed", "stopped"),
            RunnerStatusUpdated("i-2", "a", "ready", activation_address="tcp://x:1"),
            NodeLabelled("a", "k", "v"),
        ],
        now=0.0,
    )
    unrelated = IndexedEvent(5, 1, "m", -1, NodeLabelled("m", "k", "v"))
    outbox.applied([unrelated], now=0.1, instances={"i-2"})
    assert len(outbox) == 3  # no deletion seen: nothing is judged
    outbox.applied([IndexedEvent(6, 1, "m", -1, InstanceDeleted("i-1"))], now=0.2, instances={"i-2"})
    assert len(outbox) == 2
    resent = outbox.stale(now=5.0)
    assert [type(local.event).__name__ for batch in resent for local in batch] == [
        "RunnerStatusUpdated",
        "NodeLabelled",
    ]
