"""Sequencer, origin de-duplication, in-order release and gap requests (sans-IO)."""

from __future__ import annotations

import pytest

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
from exo.roles.sequencer import (
    GAP_RETRY_INITIAL,
    GAP_RETRY_MAX,
    EventOrderer,
    GapRequest,
    OriginHighWater,
    Sequencer,
)


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


def test_orderer_releases_in_order_and_counts_duplicates() -> None:
    orderer = EventOrderer(last_applied=0)
    assert orderer.receive([indexed(2), indexed(3)]) == []
    assert orderer.has_gap
    assert [e.index for e in orderer.receive([indexed(1)])] == [1, 2, 3]
    assert orderer.receive([indexed(2), indexed(3)]) == []
    assert orderer.duplicates == 2
    assert not orderer.has_gap


def test_gap_request_names_the_missing_range_with_capped_backoff() -> None:
    orderer = EventOrderer(last_applied=4)
    orderer.receive([indexed(9)])
    assert orderer.gap(0.0) == GapRequest(4, 8)
    assert orderer.gap(0.0) is None  # backing off
    now, delays = 0.0, []
    for _ in range(8):
        previous = now
        while (request := orderer.gap(now)) is None:
            now = round(now + 0.01, 2)
        assert request == GapRequest(4, 8)
        delays.append(round(now - previous, 2))
    assert delays[0] == pytest.approx(GAP_RETRY_INITIAL, abs=0.011)
    assert max(delays) == pytest.approx(GAP_RETRY_MAX, abs=0.011)
    # Progress resets the backoff.
    orderer.receive([indexed(i) for i in range(5, 9)])
    assert orderer.last_applied == 9 and orderer.gap(now) is None


def test_gap_from_the_masters_announced_last_index() -> None:
    orderer = EventOrderer(last_applied=10)
    assert orderer.gap(0.0, known_last_index=10) is None
    assert orderer.gap(0.0, known_last_index=15) == GapRequest(10, 15)


def test_reset_after_snapshot_keeps_only_newer_pending_events() -> None:
    orderer = EventOrderer(0)
    orderer.receive([indexed(5), indexed(60)])
    orderer.reset(50)
    assert orderer.receive([]) == []
    assert [e.index for e in orderer.receive([indexed(51)])] == [51]
    assert orderer.has_gap  # 60 still pending


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


@pytest.mark.parametrize(
    ("batch", "released", "buffered"),
    [
        pytest.param([4, 5, 6], [4, 5, 6], 0, id="continues-exactly"),
        pytest.param([5, 6], [], 2, id="starts-after-a-gap"),
        pytest.param([4, 6, 5], [4, 5, 6], 0, id="out-of-order-inside"),
        pytest.param([4, 4, 5], [4, 5], 0, id="duplicate-inside"),
        pytest.param([2, 3, 4], [4], 0, id="overlaps-what-was-applied"),
        pytest.param([4, 5, 7], [4, 5], 1, id="hole-inside"),
    ],
)
def test_orderer_batches_that_continue_or_not(batch: list[int], released: list[int], buffered: int) -> None:
    orderer = EventOrderer(last_applied=3)
    assert [e.index for e in orderer.receive([indexed(i) for i in batch])] == released
    assert orderer.last_applied == (released[-1] if released else 3)
    assert orderer.buffered == buffered


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
