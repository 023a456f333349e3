"""Table tests of the Raft core (exo/roles/raft.py), one rule each."""

from __future__ import annotations

import random

import pytest

from exo.core.events import IndexedEvent, MasterElected, NodeJoined, NodeLabelled, NodeRemoved
from exo.core.raft_messages import (
    EntriesAcknowledged,
    EntriesSent,
    SnapshotOffered,
    VoteAnswered,
    VoteRequested,
)
from exo.roles.raft import (
    Action,
    Apply,
    FetchSnapshot,
    MembershipChangePending,
    PersistTerm,
    Raft,
    RaftTimings,
    RoleChanged,
    Send,
    WriteLog,
)

TIMINGS = RaftTimings(election_timeout=1.0, heartbeat_interval=0.1)
VOTERS = frozenset({"a", "b", "c"})


def entry(index: int, term: int, value: str = "") -> IndexedEvent:
    return IndexedEvent(index, term, "x", index, NodeLabelled("a", "k", value or f"{index}/{term}"))


def log_of(*terms: int) -> list[IndexedEvent]:
    return [entry(index, term) for index, term in enumerate(terms, start=1)]


def make(
    node_id: str = "a",
    log: list[IndexedEvent] | None = None,
    term: int = 0,
    voters: frozenset[str] = VOTERS,
    applied: int = 0,
) -> Raft:
    return Raft(
        node_id,
        random.Random(1),
        0.0,
        term=term,
        log=log or [],
        applied=applied,
        base_voters=voters,
        timings=TIMINGS,
    )


def sent(actions: list[Action]) -> list[object]:
    return [action.message for action in actions if isinstance(action, Send)]


def elect(raft: Raft, now: float = 5.0) -> list[Action]:
    """Run `raft` through pre-vote and vote with every peer granting."""
    actions = raft.tick(now)
    for peer in sorted(raft.voters - {raft.node_id}):
        actions += raft.receive(VoteAnswered(raft.term + 1, peer, raft.node_id, True, pre_vote=True), now)
    for peer in sorted(raft.voters - {raft.node_id}):
        actions += raft.receive(VoteAnswered(raft.term, peer, raft.node_id, True), now)
    assert raft.role == "leader"
    return actions


# --- voting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mine", "their_last_term", "their_last_index", "granted"),
    [
        ((1, 1, 2), 3, 1, True),  # higher last term wins whatever the length
        ((1, 1, 2), 1, 5, False),  # lower last term loses whatever the length
        ((1, 1, 2), 2, 3, True),  # same last term, same length
        ((1, 1, 2), 2, 4, True),  # same last term, longer
        ((1, 1, 2), 2, 2, False),  # same last term, shorter
        ((), 0, 0, True),  # two empty logs
    ],
)
def test_votes_only_for_a_log_at_least_as_up_to_date(
    mine: tuple[int, ...], their_last_term: int, their_last_index: int, granted: bool
) -> None:
    raft = make("b", log_of(*mine), term=2)
    answers = sent(raft.receive(VoteRequested(3, "a", "b", their_last_index, their_last_term), 9.0))
    assert answers == [VoteAnswered(3, "b", "a", granted)]


def test_one_vote_per_term_persisted_before_it_is_sent() -> None:
    raft = make("b", term=1)
    actions = raft.receive(VoteRequested(2, "a", "b", 0, 0), 9.0)
    assert actions[-2:] == [PersistTerm(2, "a"), Send(VoteAnswered(2, "b", "a", True))]
    assert sent(raft.receive(VoteRequested(2, "c", "b", 0, 0), 9.0)) == [VoteAnswered(2, "b", "c", False)]
    assert sent(raft.receive(VoteRequested(2, "a", "b", 0, 0), 9.0)) == [VoteAnswered(2, "b", "a", True)]


def test_pre_vote_changes_no_term() -> None:
    raft = make("a", term=4)
    actions = raft.tick(5.0)
    assert raft.term == 4 and raft.role == "pre_candidate"
    assert sent(actions) == [
        VoteRequested(5, "a", "b", 0, 0, pre_vote=True),
        VoteRequested(5, "a", "c", 0, 0, pre_vote=True),
    ]
    voter = make("b", term=4)
    answer = voter.receive(VoteRequested(5, "a", "b", 0, 0, pre_vote=True), 9.0)
    assert sent(answer) == [VoteAnswered(5, "b", "a", True, pre_vote=True)] and voter.term == 4


def test_a_node_back_from_a_partition_cannot_depose_a_healthy_master() -> None:
    follower = make("b", log_of(1), term=1)
    follower.receive(EntriesSent(1, "a", "b", 1, 1, [], 1), 5.0)  # the master was heard just now
    for pre_vote in (True, False):
        request = VoteRequested(7, "c", "b", 9, 9, pre_vote=pre_vote)
        assert follower.receive(request, 5.5) == []
    assert follower.term == 1 and follower.leader_id == "a"
    # One election timeout without the master: the lease is over.
    assert sent(follower.receive(VoteRequested(7, "c", "b", 9, 9, pre_vote=True), 6.1))[0] == VoteAnswered(
        7, "b", "c", True, pre_vote=True
    )


def test_election_timeouts_come_from_the_injected_rng() -> None:
    def first_campaign(seed: int) -> float:
        raft = Raft("a", random.Random(seed), 0.0, base_voters=VOTERS, timings=TIMINGS)
        now = 0.0
        while not raft.tick(now):
            now += 0.01
        return now

    assert first_campaign(1) == first_campaign(1)
    assert len({first_campaign(seed) for seed in range(8)}) > 1
    assert all(1.0 <= first_campaign(seed) < 2.01 for seed in range(8))


def test_a_lone_voter_is_its_own_majority() -> None:
    raft = make("a", voters=frozenset({"a"}))
    actions = raft.tick(5.0)
    assert raft.role == "leader" and raft.term == 1
    write = next(a for a in actions if isinstance(a, WriteLog))
    assert write.entries[0].event == MasterElected(1, "a")
    assert raft.persisted(1, 1) == [Apply(write.entries)]


def test_a_bootstrapping_node_logs_itself_as_the_first_voter() -> None:
    joined = NodeJoined("a", "a:1")
    raft = Raft("a", random.Random(1), 0.0, bootstrap=joined, timings=TIMINGS)
    actions = raft.tick(5.0)
    write = next(a for a in actions if isinstance(a, WriteLog))
    assert [e.event for e in write.entries] == [MasterElected(1, "a"), joined]
    assert raft.voters == {"a"}
    # A node that never bootstraps does not campaign with no voters in its log.
    assert Raft("b", random.Random(1), 0.0, timings=TIMINGS).tick(50.0) == []


# --- check-quorum --------------------------------------------------------------------------------


def test_a_master_without_a_majority_for_an_election_timeout_steps_down() -> None:
    raft = make("a")
    elect(raft)
    raft.receive(EntriesAcknowledged(1, "b", "a", True, 0), 5.5)
    assert raft.tick(6.2) != [] and raft.role == "leader"  # b heard 0.7 s ago: a majority with a
    actions = raft.tick(6.6)
    assert raft.role == "follower" and RoleChanged("follower", 1, None) in actions
    assert raft.has_quorum(6.6) is False


# --- replication -----------------------------------------------------------------------------------


def test_append_refused_when_prev_does_not_match_with_a_hint() -> None:
    follower = make("b", log_of(1, 1, 2, 2), term=3)
    answer = sent(follower.receive(EntriesSent(3, "a", "b", 4, 3, [], 0), 1.0))
    assert answer == [EntriesAcknowledged(3, "b", "a", False, hint_index=2)]  # skips term 2 whole
    answer = sent(follower.receive(EntriesSent(3, "a", "b", 9, 3, [], 0), 1.0))
    assert answer == [EntriesAcknowledged(3, "b", "a", False, hint_index=4)]


def test_conflicting_uncommitted_entries_are_replaced() -> None:
    follower = make("b", log_of(1, 2, 2), term=3)
    new = [entry(2, 3, "new")]
    actions = follower.receive(EntriesSent(3, "a", "b", 1, 1, new, 0), 1.0)
    assert WriteLog(1, new) in actions
    assert follower.log == [*log_of(1), *new] and follower.durable_index == 1


def test_a_committed_entry_is_never_removed() -> None:
    follower = make("b", log_of(1, 1), term=1, applied=2)
    with pytest.raises(AssertionError, match="committed"):
        follower.receive(EntriesSent(2, "a", "b", 1, 1, [entry(2, 2)], 0), 1.0)


def test_followers_acknowledge_only_what_is_durable() -> None:
    follower = make("b", log_of(1), term=1)
    new = [entry(2, 1), entry(3, 1)]
    answer = sent(follower.receive(EntriesSent(1, "a", "b", 1, 1, new, 1), 1.0))
    assert answer == [EntriesAcknowledged(1, "b", "a", True, match_index=1)]
    assert sent(follower.persisted(3, 1)) == [EntriesAcknowledged(1, "b", "a", True, match_index=3)]
    assert follower.persisted(2, 7) == []  # a report for a log that no longer exists


def test_commit_needs_a_durable_majority_in_the_current_term() -> None:
    raft = make("a", log_of(1), term=1)
    actions = elect(raft)
    assert raft.term == 2 and raft.commit_index == 0
    elected = next(a for a in actions if isinstance(a, WriteLog)).entries
    assert (
        raft.receive(EntriesAcknowledged(2, "b", "a", True, match_index=2), 5.1) == []
    )  # leader not durable
    applied = [a for a in raft.persisted(2, 2) if isinstance(a, Apply)]
    assert applied == [Apply([entry(1, 1), *elected])] and raft.commit_index == 2


def test_an_earlier_term_entry_is_not_committed_by_counting_replicas() -> None:
    """The Raft paper's figure 8: entry 2 of term 2 on a majority is not committed by a term-4
    master until an entry of term 4 is."""
    raft = make("a", log_of(1, 2), term=3)
    elect(raft)
    raft.persisted(2, 2)
    raft.receive(EntriesAcknowledged(4, "b", "a", True, match_index=2), 5.1)
    assert raft.commit_index == 0
    raft.persisted(3, 4)
    assert raft.commit_index == 0  # its own entry is durable on itself alone
    raft.receive(EntriesAcknowledged(4, "b", "a", True, match_index=3), 5.2)
    assert raft.commit_index == 3


def test_the_commit_index_reaches_followers() -> None:
    follower = make("b", log_of(1, 1), term=1)
    actions = follower.receive(EntriesSent(1, "a", "b", 2, 1, [], 2), 1.0)
    assert Apply(log_of(1, 1)) in actions and follower.commit_index == 2
    # Never beyond what matched the master's log.
    other = make("c", log_of(1, 1, 1), term=1)
    other.receive(EntriesSent(2, "a", "c", 1, 1, [], 5), 1.0)
    assert other.commit_index == 1


def test_stale_master_learns_the_new_term_from_a_refusal() -> None:
    raft = make("a")
    elect(raft)
    actions = raft.receive(EntriesAcknowledged(9, "b", "a", False), 5.1)
    assert raft.role == "follower" and raft.term == 9 and PersistTerm(9, None) in actions


# --- membership ------------------------------------------------------------------------------------


def test_voters_are_the_logs_joined_minus_removed() -> None:
    events = [NodeJoined("a", "a:1"), NodeJoined("b", "b:1"), NodeJoined("c", "c:1"), NodeRemoved("b")]
    log = [IndexedEvent(i, 1, "a", -1, event) for i, event in enumerate(events, start=1)]
    raft = Raft("a", random.Random(1), 0.0, log=log, timings=TIMINGS)
    assert raft.voters == {"a", "c"}
    raft.receive(EntriesSent(2, "c", "a", 2, 1, [entry(3, 2)], 0), 1.0)  # truncates the join of c
    assert raft.voters == {"a", "b"}


def test_one_membership_change_at_a_time() -> None:
    raft = make("a")
    elect(raft)
    raft.propose([("a", -1, NodeJoined("d", "d:1"))])
    with pytest.raises(MembershipChangePending):
        raft.propose([("a", -1, NodeJoined("e", "e:1"))])
    with pytest.raises(MembershipChangePending):
        raft.propose([("a", -1, NodeRemoved("a"))])
    raft.propose([("a", -1, NodeJoined("b", "b:1"))])  # already a voter: no change


def test_a_voter_silent_past_remove_after_is_removed() -> None:
    timings = RaftTimings(election_timeout=1.0, heartbeat_interval=0.1, remove_after=10.0)
    raft = Raft("a", random.Random(1), 0.0, base_voters=VOTERS, timings=timings)
    elect(raft)
    raft.persisted(1, 1)
    for now in (5.5, 8.0, 11.0, 14.0, 14.9):
        raft.receive(EntriesAcknowledged(1, "b", "a", True, match_index=raft.last_index), now)
        raft.tick(now)
    actions = raft.tick(15.1)
    writes = [a for a in actions if isinstance(a, WriteLog)]
    assert writes and writes[0].entries[0].event == NodeRemoved("c")
    assert raft.voters == {"a", "b"}


def test_force_remove_lets_the_survivor_of_two_commit_alone() -> None:
    raft = make("a", log_of(1), term=1, voters=frozenset({"a", "b"}))
    actions = raft.force_remove("b")
    assert raft.role == "leader" and raft.term == 2 and raft.voters == {"a"}
    last = [a for a in actions if isinstance(a, WriteLog)][-1].entries[-1]
    assert last.event == NodeRemoved("b")
    raft.persisted(last.index, 2)
    assert raft.commit_index == last.index


# --- the node shell's overrides ------------------------------------------------------------------


def test_a_transfer_vote_is_answered_within_the_lease_and_keeps_the_log_rule() -> None:
    """A `--force-master` node's election (campaign_now) skips pre-vote; voters answer it even while
    they hear a master, but only for a log at least as up to date as theirs."""
    forced = make("c", log_of(1), term=1)
    actions = forced.campaign_now()
    assert forced.role == "candidate" and forced.term == 2
    assert VoteRequested(2, "c", "a", 1, 1, transfer=True) in sent(actions)
    follower = make("b", log_of(1), term=1)
    follower.receive(EntriesSent(1, "a", "b", 1, 1, [], 1), 5.0)  # the master was heard just now
    granted = sent(follower.receive(VoteRequested(2, "c", "b", 1, 1, transfer=True), 5.1))
    assert granted == [VoteAnswered(2, "b", "c", True)]
    behind = make("b", log_of(1, 1), term=1)
    behind.receive(EntriesSent(1, "a", "b", 2, 1, [], 2), 5.0)
    refused = sent(behind.receive(VoteRequested(2, "c", "b", 1, 1, transfer=True), 5.1))
    assert refused == [VoteAnswered(2, "b", "c", False)]


def test_step_down_leaves_the_lead_in_the_same_term() -> None:
    leader = make("a")
    elect(leader)
    term = leader.term
    assert leader.step_down() == [RoleChanged("follower", term, None)]
    assert leader.role == "follower" and leader.term == term
    assert leader.step_down() == []


# --- compaction and snapshots ------------------------------------------------------------------


def joined(index: int, term: int, node_id: str) -> IndexedEvent:
    return IndexedEvent(index, term, "x", index, NodeJoined(node_id, f"{node_id}:1"))


def test_compact_moves_the_base_with_its_term_and_voters() -> None:
    log = [entry(1, 1), joined(2, 1, "d"), entry(3, 2), entry(4, 2)]
    raft = make("a", list(log), term=2, applied=3)
    raft.compact(2)
    assert (raft.base_index, raft.base_term, raft.base_voters) == (2, 1, VOTERS | {"d"})
    assert raft.log == log[2:] and raft.last_index == 4 and raft.voters == VOTERS | {"d"}
    assert raft.entries(1, 10) == log[2:] and raft.term_at(1) is None and raft.term_at(2) == 1
    raft.compact(1)  # behind the base: nothing to do
    assert raft.base_index == 2
    with pytest.raises(ValueError, match="applied"):
        raft.compact(4)  # not applied yet


def test_a_master_offers_a_snapshot_to_a_follower_behind_its_base() -> None:
    raft = make("a", log_of(1, 1, 1), term=1, applied=3)
    raft.compact(3)
    elect(raft)
    offers = [m for m in sent(raft.tick(5.2)) if isinstance(m, SnapshotOffered)]
    assert SnapshotOffered(2, "a", "b", 3, 1, ["a", "b", "c"]) not in offers  # b is probed from the end
    # b answers it holds nothing: the entries it needs are compacted away.
    answer = sent(raft.receive(EntriesAcknowledged(2, "b", "a", False, hint_index=0), 5.3))
    assert answer == [SnapshotOffered(2, "a", "b", 3, 1, ["a", "b", "c"])]
    # Once installed, b's acknowledgement moves it past the base: entries follow.
    answer = sent(raft.receive(EntriesAcknowledged(2, "b", "a", True, match_index=3), 5.4))
    assert [type(m) for m in answer] == [EntriesSent] and answer[0] == EntriesSent(
        2, "a", "b", 3, 1, raft.log, raft.commit_index
    )


def test_a_follower_behind_the_offer_fetches_then_installs_and_acknowledges() -> None:
    follower = make("b", log_of(1), term=1)
    actions = follower.receive(SnapshotOffered(2, "a", "b", 5, 2, ["a", "b", "c", "d"]), 1.0)
    assert FetchSnapshot("a", 5, 2, VOTERS | {"d"}) in actions and follower.term == 2
    assert not follower.keeps_log(5, 2)
    answer = sent(follower.install_snapshot(5, 2, VOTERS | {"d"}))
    assert answer == [EntriesAcknowledged(2, "b", "a", True, match_index=5)]
    assert (follower.base_index, follower.log, follower.commit_index, follower.applied) == (5, [], 5, 5)
    assert follower.voters == VOTERS | {"d"} and follower.last_term == 2
    assert follower.install_snapshot(5, 2, VOTERS) == []  # a duplicate changes nothing
    # Entries continue after the snapshot.
    follower.receive(EntriesSent(2, "a", "b", 5, 2, [entry(6, 2)], 6), 1.1)
    assert follower.last_index == 6 and follower.commit_index == 6


def test_install_keeps_the_entries_after_a_matching_snapshot_index() -> None:
    """Figure 13, rule 6: the log holds the snapshot's last entry, so what follows it stays."""
    follower = make("b", [entry(1, 1), entry(2, 1), joined(3, 1, "d"), entry(4, 2)], term=2)
    follower.persisted(4, 2)
    assert follower.keeps_log(2, 1)
    follower.install_snapshot(2, 1, VOTERS)
    assert follower.log == [joined(3, 1, "d"), entry(4, 2)] and follower.last_index == 4
    assert follower.voters == VOTERS | {"d"} and follower.durable_index == 4
    assert follower.commit_index == 2


def test_install_drops_a_conflicting_log() -> None:
    follower = make("b", log_of(1, 1, 1, 1), term=1)  # uncommitted entries 2..4 of a lost term
    assert not follower.keeps_log(3, 2)
    follower.install_snapshot(3, 2, VOTERS)
    assert follower.log == [] and follower.last_index == 3 and follower.last_term == 2


def test_an_offer_below_the_commit_index_is_acknowledged_not_fetched() -> None:
    follower = make("b", log_of(1, 1, 1), term=1, applied=3)
    actions = follower.receive(SnapshotOffered(1, "a", "b", 2, 1, ["a", "b", "c"]), 1.0)
    assert not [a for a in actions if isinstance(a, FetchSnapshot)]
    assert sent(actions) == [EntriesAcknowledged(1, "b", "a", True, match_index=2)]
    # A stale master's offer is refused with the newer term.
    stale = follower.receive(SnapshotOffered(0, "c", "b", 9, 1, ["a"]), 1.1)
    assert sent(stale) == [EntriesAcknowledged(1, "b", "c", False)]
    assert follower.log == log_of(1, 1, 1)
