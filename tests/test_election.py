"""Table tests of the sans-IO election core, and a simulated cluster driving several cores."""

from __future__ import annotations

import pytest

from exo.core.messages import CampaignStarted, Heartbeat, Rank, VictoryDeclared
from exo.roles.election import (
    Action,
    AnnounceCampaign,
    AnnounceVictory,
    BecomeMaster,
    Election,
    FollowMaster,
    PersistTerm,
)

INTERVAL = 0.1
WINDOW = INTERVAL * 2
STARTUP = INTERVAL * 6


def make(node_id: str, term: int = 0, force: bool = False) -> Election:
    return Election(node_id, term, force, started_at=0.0, interval=INTERVAL, liveness=6)


def heartbeat(
    node_id: str, term: int, master: str | None, last_index: int = 0, quorum: bool = True
) -> Heartbeat:
    return Heartbeat(
        node_id, term, master, Rank(False, last_index, node_id), bus_port=1, master_term=term, quorum=quorum
    )


@pytest.mark.parametrize(
    ("mine", "theirs", "i_win"),
    [
        (Rank(False, 10, "a"), Rank(False, 5, "z"), True),  # most up-to-date first
        (Rank(False, 5, "a"), Rank(False, 10, "z"), False),
        (Rank(False, 5, "b"), Rank(False, 5, "a"), True),  # then node id
        (Rank(True, 0, "a"), Rank(False, 99, "z"), True),  # --force-master beats everything
        (Rank(False, 99, "z"), Rank(True, 0, "a"), False),
    ],
)
def test_rank_order(mine: Rank, theirs: Rank, i_win: bool) -> None:
    assert (mine > theirs) is i_win


def test_waits_one_liveness_window_then_campaigns() -> None:
    election = make("a")
    assert election.on_tick(STARTUP - 0.01, 0, set()) == []
    actions = election.on_tick(STARTUP, 0, set())
    assert actions == [PersistTerm(1), AnnounceCampaign(CampaignStarted(1, Rank(False, 0, "a")))]
    assert election.phase == "candidate"


def test_alone_wins_after_the_campaign_window() -> None:
    election = make("a", term=4)
    election.on_tick(STARTUP, 7, set())
    assert election.on_tick(STARTUP + WINDOW - 0.01, 7, set()) == []
    actions = election.on_tick(STARTUP + WINDOW, 7, set())
    assert actions == [AnnounceVictory(VictoryDeclared(5, Rank(False, 7, "a"))), BecomeMaster(5)]
    assert election.phase == "master" and election.master_node_id == "a"


def test_waiting_node_follows_a_sitting_master() -> None:
    election = make("a")
    actions = election.on_heartbeat(heartbeat("m", 3, "m"), 0.1, 0, True)
    assert actions == [PersistTerm(3), FollowMaster("m", 3)]
    assert election.phase == "follower"


def test_follower_ignores_a_heartbeat_from_a_non_master() -> None:
    election = make("a")
    assert election.on_heartbeat(heartbeat("b", 3, "m"), 0.1, 0, True) == []
    assert election.phase == "waiting"


def test_follower_campaigns_when_master_goes_silent() -> None:
    election = make("a", term=2)
    election.on_heartbeat(heartbeat("m", 2, "m"), 0.1, 0, True)
    assert election.on_tick(1.0, 0, {"m"}) == []
    actions = election.on_tick(2.0, 0, set())
    assert actions[0] == PersistTerm(3)
    assert election.phase == "candidate"


def test_higher_ranked_node_answers_a_campaign_with_its_own() -> None:
    election = make("z")
    actions = election.on_campaign(CampaignStarted(1, Rank(False, 0, "a")), 0.1, 0)
    assert actions == [PersistTerm(1), AnnounceCampaign(CampaignStarted(1, Rank(False, 0, "z")))]
    assert election.on_tick(0.1 + WINDOW, 0, set())[-1] == BecomeMaster(1)


def test_lower_ranked_node_joins_without_announcing_and_loses() -> None:
    election = make("a")
    actions = election.on_campaign(CampaignStarted(1, Rank(False, 0, "z")), 0.1, 0)
    assert actions == [PersistTerm(1)]
    assert election.on_tick(0.1 + WINDOW, 0, set()) == []
    assert election.on_victory(VictoryDeclared(1, Rank(False, 0, "z")), 0.5, 0) == [FollowMaster("z", 1)]


def test_winner_that_never_declares_leads_to_a_new_term() -> None:
    election = make("a")
    election.on_campaign(CampaignStarted(1, Rank(False, 0, "z")), 0.1, 0)
    actions = election.on_tick(0.1 + WINDOW * 3, 0, set())
    assert actions[0] == PersistTerm(2)
    assert election.term == 2


@pytest.mark.parametrize(
    "message",
    [
        CampaignStarted(2, Rank(True, 100, "z")),
        VictoryDeclared(2, Rank(True, 100, "z")),
    ],
)
def test_messages_from_a_stale_term_are_dropped(message: CampaignStarted | VictoryDeclared) -> None:
    election = make("a", term=5)
    if isinstance(message, CampaignStarted):
        assert election.on_campaign(message, 0.1, 0) == []
    else:
        assert election.on_victory(message, 0.1, 0) == []
    assert election.term == 5 and election.phase == "waiting"


def test_master_steps_down_for_a_higher_term() -> None:
    election = make("a")
    election.on_tick(STARTUP, 0, set())
    election.on_tick(STARTUP + WINDOW, 0, set())
    assert election.phase == "master"
    actions = election.on_heartbeat(heartbeat("b", 9, "b"), 2.0, 0, True)
    assert actions == [PersistTerm(9), FollowMaster("b", 9)]


def test_two_masters_in_one_term_resolve_by_rank() -> None:
    low, high = make("a"), make("b")
    for election in (low, high):
        election.on_tick(STARTUP, 0, set())
        election.on_tick(STARTUP + WINDOW, 0, set())
    assert low.phase == high.phase == "master"
    # The bigger log does not matter here: both logs diverged; every node breaks the tie the same way.
    assert high.on_heartbeat(heartbeat("a", 1, "a", last_index=50), 2.0, 0, True) == [
        AnnounceVictory(VictoryDeclared(1, Rank(False, 0, "b")))
    ]
    assert low.on_heartbeat(heartbeat("b", 1, "b"), 2.0, 50, True) == [FollowMaster("b", 1)]


@pytest.mark.parametrize(
    ("mine", "theirs", "i_step_down"),
    [
        ((True, 5), (False, 9), False),  # a majority outranks a higher term without one
        ((False, 9), (True, 5), True),
        ((True, 5), (True, 6), True),  # then the higher term
        ((False, 6), (False, 5), False),
    ],
)
def test_healed_partition_keeps_the_majority_master(
    mine: tuple[bool, int], theirs: tuple[bool, int], i_step_down: bool
) -> None:
    election = make("a", term=mine[1] - 1)
    election.on_tick(STARTUP, 0, set())
    election.on_tick(STARTUP + WINDOW, 0, set())
    assert election.phase == "master" and election.master_term == mine[1]
    actions = election.on_heartbeat(heartbeat("b", theirs[1], "b", quorum=theirs[0]), 2.0, 0, mine[0])
    assert (election.phase == "follower") is i_step_down
    assert (FollowMaster("b", theirs[1]) in actions) is i_step_down


def test_follower_switches_only_to_a_stronger_master() -> None:
    election = make("f", term=3)
    election.on_heartbeat(heartbeat("m", 3, "m", quorum=True), 0.1, 0, False)
    assert election.on_heartbeat(heartbeat("x", 7, "x", quorum=False), 0.2, 0, False) == []
    assert election.master_node_id == "m"
    assert election.on_heartbeat(heartbeat("y", 4, "y", quorum=True), 0.3, 0, False) == [
        PersistTerm(4),
        FollowMaster("y", 4),
    ]


def test_same_term_victory_does_not_unseat_a_master() -> None:
    election = make("b")
    election.on_tick(STARTUP, 0, set())
    election.on_tick(STARTUP + WINDOW, 0, set())
    assert election.on_victory(VictoryDeclared(1, Rank(False, 0, "a")), 2.0, 0) == []
    assert election.phase == "master"


def test_illegal_transition_is_refused() -> None:
    election = make("a")
    with pytest.raises(AssertionError):
        election._move("master")


class SimulatedCluster:
    """Delivers every announced message to every other core, in order, with no loss."""

    def __init__(self, elections: list[Election], last_index: dict[str, int]) -> None:
        self.elections = {e.node_id: e for e in elections}
        self.last_index = last_index
        self.masters: dict[str, int] = {}

    def run(self, until: float, alive: set[str]) -> None:
        now = 0.0
        while now <= until:
            for node_id in sorted(alive):
                self.deliver(
                    node_id, self.elections[node_id].on_tick(now, self.last_index[node_id], alive), now
                )
            now = round(now + INTERVAL / 2, 6)

    def deliver(self, sender: str, actions: list[Action], now: float) -> None:
        for action in actions:
            match action:
                case AnnounceCampaign(message):
                    for node_id, election in self.elections.items():
                        if node_id != sender:
                            self.deliver(
                                node_id, election.on_campaign(message, now, self.last_index[node_id]), now
                            )
                case AnnounceVictory(message):
                    for node_id, election in self.elections.items():
                        if node_id != sender:
                            self.deliver(
                                node_id, election.on_victory(message, now, self.last_index[node_id]), now
                            )
                case BecomeMaster(term):
                    self.masters[sender] = term
                case PersistTerm() | FollowMaster():
                    pass


@pytest.mark.parametrize(
    ("last_index", "forced", "winner"),
    [
        ({"a": 0, "b": 0, "c": 0}, None, "c"),
        ({"a": 9, "b": 3, "c": 3}, None, "a"),
        ({"a": 9, "b": 3, "c": 3}, "b", "b"),
    ],
)
def test_simultaneous_start_elects_exactly_the_best_ranked(
    last_index: dict[str, int], forced: str | None, winner: str
) -> None:
    elections = [make(node_id, force=node_id == forced) for node_id in ("a", "b", "c")]
    cluster = SimulatedCluster(elections, last_index)
    cluster.run(until=2.0, alive={"a", "b", "c"})
    assert list(cluster.masters) == [winner]
    assert {e.master_node_id for e in elections} == {winner}
    assert len({e.term for e in elections}) == 1


def test_repeated_victory_for_the_followed_master_is_ignored() -> None:
    election = make("a")
    victory = VictoryDeclared(2, Rank(False, 0, "m"))
    assert election.on_victory(victory, 0.1, 0) == [PersistTerm(2), FollowMaster("m", 2)]
    assert election.on_victory(victory, 0.2, 0) == []


def test_a_stale_master_cannot_win_a_follower_right_after_a_victory() -> None:
    election = make("a", term=1)
    election.on_victory(VictoryDeclared(2, Rank(False, 0, "new")), 0.1, 0)
    # The old master (term 1), healed back with a majority view, heartbeats before the new one does.
    assert election.on_heartbeat(heartbeat("old", 1, "old", quorum=True), 0.15, 0, True) == []
    assert election.master_node_id == "new"


def test_a_forced_node_joining_a_running_cluster_takes_over() -> None:
    sitting = make("a")
    sitting.on_tick(STARTUP, 5, set())
    sitting.on_tick(STARTUP + WINDOW, 5, set())
    assert sitting.phase == "master" and sitting.master_term == 1
    forced = make("f", force=True)
    actions = forced.on_heartbeat(heartbeat("a", 1, "a", last_index=5), 0.1, 0, False)
    campaign = CampaignStarted(2, Rank(True, 0, "f"))  # the term after the sitting master's
    assert actions == [PersistTerm(2), AnnounceCampaign(campaign)]
    assert sitting.on_campaign(campaign, 0.2, 5) == [PersistTerm(2)]  # outranked: no counter-campaign
    actions = forced.on_tick(0.1 + forced.campaign_window, 0, {"a"})
    victory = VictoryDeclared(2, Rank(True, 0, "f"))
    assert actions == [AnnounceVictory(victory), BecomeMaster(2)]
    assert sitting.on_victory(victory, 1.0, 5) == [FollowMaster("f", 2)]
    # The old master's last heartbeat, still in flight, changes nothing.
    assert forced.on_heartbeat(heartbeat("a", 1, "a", last_index=5), 1.1, 0, True)[0] == AnnounceVictory(
        VictoryDeclared(2, Rank(True, 0, "f"))
    )
    assert forced.phase == "master"


def test_a_forced_node_follows_a_forced_master_and_a_victory_of_one() -> None:
    forced_master = Heartbeat("m", 3, "m", Rank(True, 0, "m"), bus_port=1, master_term=3, quorum=True)
    joiner = make("f", force=True)
    assert joiner.on_heartbeat(forced_master, 0.1, 0, False) == [PersistTerm(3), FollowMaster("m", 3)]
    late = make("g", force=True)
    assert late.on_victory(VictoryDeclared(4, Rank(True, 0, "m")), 0.1, 0) == [
        PersistTerm(4),
        FollowMaster("m", 4),
    ]


def test_a_forced_node_takes_over_from_a_victory_without_the_flag() -> None:
    forced = make("f", term=6, force=True)
    assert forced.on_victory(VictoryDeclared(2, Rank(False, 9, "a")), 0.1, 0) == []  # a stale term
    actions = forced.on_victory(VictoryDeclared(8, Rank(False, 9, "a")), 0.1, 0)
    assert actions == [PersistTerm(9), AnnounceCampaign(CampaignStarted(9, Rank(True, 0, "f")))]
