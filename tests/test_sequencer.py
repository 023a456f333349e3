"""Sequencer and origin de-duplication (sans-IO); in-order release is Raft's (tests/test_raft.py)."""

from __future__ import annotations

from exo.core.events import (
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    NodeLabelled,
    RunnerStatusUpdated,
    ShardAssignment,
)
from exo.core.messages import LocalEvent
from exo.roles.liveness import Liveness
from exo.roles.sequencer import OriginHighWater, Sequencer


def label(n: int) -> NodeLabelled:
    return NodeLabelled("n", "k", str(n))


def indexed(index: int, term: int = 1) -> IndexedEvent:
    return IndexedEvent(index, term, "n", index, label(index))


def test_sequencer_assigns_contiguous_indices_in_its_term() -> None:
    sequencer = Sequencer("m", term=3, last_index=10, high_water=OriginHighWater())
    out = sequencer.sequence("a", [LocalEvent(1, label(1)), LocalEvent(2, label(2))])
    out += sequencer.sequence_own([label(3)])
    assert [(e.index, e.term, e.origin_node_id) for e in out] == [(11, 3, "a"), (12, 3, "a"), (13, 3, "m")]


def test_resent_local_events_are_sequenced_once() -> None:
    sequencer = Sequencer("m", 1, 0, OriginHighWater())
    batch = [LocalEvent(5, label(5)), LocalEvent(6, label(6))]
    assert len(sequencer.sequence("a", batch)) == 2
    assert sequencer.sequence("a", batch) == []
    # Another origin with the same sequence numbers is independent.
    assert len(sequencer.sequence("b", batch)) == 2


def test_a_lost_batch_resent_after_a_later_one_fills_its_hole() -> None:
    sequencer = Sequencer("m", 1, 0, OriginHighWater())
    assert len(sequencer.sequence("a", [LocalEvent(4, label(4)), LocalEvent(7, label(7))])) == 2
    resent = sequencer.sequence("a", [LocalEvent(5, label(5)), LocalEvent(7, label(7))])
    assert [e.origin_sequence for e in resent] == [5]
    assert sequencer.sequence("a", [LocalEvent(5, label(5))]) == []


def test_high_water_rebuilt_from_the_log_drops_what_the_old_master_sequenced() -> None:
    high_water = OriginHighWater()
    for event in [IndexedEvent(1, 1, "a", 100, label(1)), IndexedEvent(2, 1, "a", 101, label(2))]:
        high_water.observe(event)
    sequencer = Sequencer("new", 2, 2, high_water.copy())
    out = sequencer.sequence("a", [LocalEvent(101, label(2)), LocalEvent(102, label(3))])
    assert [(e.index, e.origin_sequence) for e in out] == [(3, 102)]


def test_liveness_marks_silent_peers_once_and_revives_them() -> None:
    liveness = Liveness(interval=0.1, liveness=3)
    assert liveness.heard("a", 0.0) is True
    assert liveness.heard("a", 0.1) is False
    assert liveness.expire(0.35) == []
    assert liveness.expire(0.41) == ["a"]
    assert liveness.expire(0.5) == []
    assert not liveness.is_alive("a", 0.5)
    assert liveness.heard("a", 0.6) is True
    assert liveness.alive(0.6) == {"a"}


def test_a_runner_status_for_a_deleted_or_unknown_instance_is_not_sequenced() -> None:
    """A straggler (a runner that stopped, or finished loading, after its instance was deleted) is
    dropped, once, and a resend of it too; statuses of live instances pass, in batch order."""
    assignments = {"a": ShardAssignment(0, 4, 4)}
    sequencer = Sequencer("m", 1, 10, OriginHighWater(), instances=["i-old"])
    own = sequencer.sequence_own([InstanceCreated("i-new", "exo-tiny", "Pipeline", assignments)])
    own += sequencer.sequence_own([InstanceDeleted("i-old")])
    statuses = [
        LocalEvent(1, RunnerStatusUpdated("i-old", "a", "failed", "runner exited with code -15")),
        LocalEvent(2, RunnerStatusUpdated("i-new", "a", "loading")),
        LocalEvent(3, RunnerStatusUpdated("i-never", "a", "ready", activation_address="tcp://x:1")),
    ]
    out = sequencer.sequence("a", statuses)
    assert [(e.index, e.origin_sequence) for e in own + out] == [(11, -1), (12, -1), (13, 2)]
    assert sequencer.stale_statuses_dropped == 2
    assert sequencer.sequence("a", statuses) == []
    assert sequencer.stale_statuses_dropped == 2  # the resend is not even looked at again
    sequencer.rewind(10, OriginHighWater(), ["i-old"])
    assert [e.index for e in sequencer.sequence("a", statuses[:1])] == [11]


def test_a_new_master_counts_its_uncommitted_tail() -> None:
    """A master elected with entries not yet committed (a lone node after kill -9): the instance the
    tail creates exists for its runners' statuses, and what the tail holds from an origin is no
    longer new (the statuses used to be dropped as stale and the instance never served again)."""
    assignments = {"a": ShardAssignment(0, 4, 4)}
    sequencer = Sequencer("m", 2, 10, OriginHighWater())
    created = InstanceCreated("i-tail", "exo-tiny", "Pipeline", assignments)
    sequencer.observe_log([IndexedEvent(9, 1, "m", -1, created), IndexedEvent(10, 1, "a", 5, label(5))])
    out = sequencer.sequence(
        "a", [LocalEvent(5, label(5)), LocalEvent(6, RunnerStatusUpdated("i-tail", "a", "ready"))]
    )
    assert [(e.index, e.origin_sequence) for e in out] == [(11, 6)]
