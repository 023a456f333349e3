"""Bully election with a persisted term, sans-IO.

The core takes messages and the time and returns actions; the node's shell publishes, persists and
switches roles. Ranking is deterministic (`Rank`: forced masters, then the most up-to-date log,
then the node id), so every node that sees the same campaign picks the same winner.

Rules:
- A node starts `waiting`: for one liveness window it listens for a sitting master (a heartbeat
  whose sender claims to be master) and follows it; otherwise it campaigns.
- Campaigning bumps the term, persists it and announces the node's rank. A node hearing a campaign
  for a term at least its own joins it, and answers with its own campaign when it outranks the
  campaigner. When the window closes, the highest rank heard declares victory.
- Campaign and victory messages of a term below the node's own are dropped.
- A `--force-master` node that finds a master without the flag (it joined a running cluster, or
  lost a race at start-up) campaigns for the term after that master's, and its rank wins it; a
  forced node finds a forced master by the usual rules (so two forced nodes do not take turns).
- Two masters (after a partition heals, or a race at start-up) resolve by `Precedence`: a master
  that reaches a majority of the known nodes outranks one that does not; then the higher term;
  then a forced master; then the node id. Every node compares the same heartbeat fields, so all
  pick the same one, and the loser's side drops its divergent tail (see ClusterMember).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from exo.core.messages import CampaignStarted, Heartbeat, Rank, VictoryDeclared
from exo.roles.liveness import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS

Phase = Literal["waiting", "follower", "candidate", "master"]
Precedence = tuple[bool, int, bool, str]


def precedence(heartbeat: Heartbeat) -> Precedence:
    """How strong a master's claim is (only meaningful for a heartbeat whose sender is master)."""
    return (heartbeat.quorum, heartbeat.master_term, heartbeat.rank.force_master, heartbeat.node_id)


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    "waiting": frozenset({"follower", "candidate"}),
    "follower": frozenset({"follower", "candidate"}),
    "candidate": frozenset({"candidate", "follower", "master"}),
    "master": frozenset({"follower", "candidate"}),
}


@dataclass(frozen=True)
class AnnounceCampaign:
    message: CampaignStarted


@dataclass(frozen=True)
class AnnounceVictory:
    message: VictoryDeclared


@dataclass(frozen=True)
class PersistTerm:
    term: int


@dataclass(frozen=True)
class BecomeMaster:
    term: int


@dataclass(frozen=True)
class FollowMaster:
    node_id: str
    term: int


Action = AnnounceCampaign | AnnounceVictory | PersistTerm | BecomeMaster | FollowMaster


@dataclass
class Election:
    node_id: str
    term: int
    force_master: bool
    started_at: float
    interval: float = HEARTBEAT_INTERVAL
    liveness: int = HEARTBEAT_LIVENESS
    phase: Phase = "waiting"
    master_node_id: str | None = None
    # The term of the master this node follows (its own when master); `term` may be higher.
    master_term: int = 0
    master_precedence: Precedence | None = None
    _deadline: float = 0.0
    _campaign_ranks: dict[str, Rank] = field(default_factory=dict[str, Rank])
    _announced_term: int = -1

    def __post_init__(self) -> None:
        self.restart_clock(self.started_at)

    def restart_clock(self, now: float) -> None:
        """Start the listening window now (the node's sockets are up and its peers dialled)."""
        if self.phase == "waiting":
            self._deadline = now + self.interval * self.liveness

    def my_precedence(self, quorum: bool) -> Precedence:
        return (quorum, self.master_term, self.force_master, self.node_id)

    @property
    def campaign_window(self) -> float:
        # Long enough for every live node to answer a campaign on a LAN, short enough that
        # detection (liveness window) plus this stays under two seconds.
        return self.interval * 2

    def rank(self, last_index: int) -> Rank:
        return Rank(self.force_master, last_index, self.node_id)

    # --- inputs --------------------------------------------------------------------------------

    def on_tick(self, now: float, last_index: int, alive_peers: set[str]) -> list[Action]:
        match self.phase:
            case "waiting":
                return self._campaign(now, last_index) if now >= self._deadline else []
            case "follower":
                if self.master_node_id is None or self.master_node_id not in alive_peers:
                    return self._campaign(now, last_index)
                return []
            case "candidate":
                if now < self._deadline:
                    return []
                best = max(self._campaign_ranks.values())
                if best.node_id == self.node_id:
                    return self._win()
                if now >= self._deadline + 2 * self.campaign_window:
                    # The winner never declared (died mid-election): start over in a new term.
                    return self._campaign(now, last_index)
                return []
            case "master":
                return []

    def on_campaign(self, message: CampaignStarted, now: float, last_index: int) -> list[Action]:
        if message.term < self.term or message.rank.node_id == self.node_id:
            return []
        actions: list[Action] = []
        if message.term > self.term or self.phase not in ("candidate", "master"):
            if message.term == self.term and self.phase == "follower":
                # This term already has a master; the late campaigner will hear its heartbeats.
                return []
            if message.term > self.term:
                self.term = message.term
                actions.append(PersistTerm(self.term))
                self._campaign_ranks = {}
            self._move("candidate")
            self.master_node_id = None
            self.master_precedence = None
            self._deadline = now + self.campaign_window
        if self.phase == "master":
            # A late campaigner in the term this node already won: tell it again.
            return [AnnounceVictory(VictoryDeclared(self.term, self.rank(last_index)))]
        self._campaign_ranks[message.rank.node_id] = message.rank
        mine = self.rank(last_index)
        self._campaign_ranks[self.node_id] = mine
        if mine > message.rank and self._announced_term < self.term:
            self._announced_term = self.term
            actions.append(AnnounceCampaign(CampaignStarted(self.term, mine)))
        return actions

    def on_victory(self, message: VictoryDeclared, now: float, last_index: int) -> list[Action]:
        if message.term < self.term or message.rank.node_id == self.node_id:
            return []
        if self.phase == "master" and message.term == self.term:
            # Same-term race: resolved by heartbeats (they carry quorum), not by this message.
            return []
        if self._takes_over_from(message.rank.force_master):
            return self._campaign(now, last_index, after=message.term)
        if self.master_node_id == message.rank.node_id and self.master_term == message.term:
            return []  # already following it (victories are repeated to late campaigners)
        # Provisional precedence until the master's own heartbeat says whether it has a majority:
        # a stray heartbeat from an older master must not win in between.
        provisional = (True, message.term, message.rank.force_master, message.rank.node_id)
        return self._follow(message.rank.node_id, message.term, provisional)

    def on_heartbeat(self, heartbeat: Heartbeat, now: float, last_index: int, quorum: bool) -> list[Action]:
        """`quorum`: whether this node, as master, reaches a majority of the known nodes now."""
        if heartbeat.master_node_id != heartbeat.node_id:
            return []  # only a master's own heartbeat says anything about who leads
        if self._takes_over_from(heartbeat.rank.force_master):
            return self._campaign(now, last_index, after=heartbeat.master_term)
        claim = precedence(heartbeat)
        if heartbeat.node_id == self.master_node_id:
            self.master_precedence = claim
            if heartbeat.master_term > self.master_term:
                return self._follow(heartbeat.node_id, heartbeat.master_term, claim)
            return []
        match self.phase:
            case "master":
                if claim > self.my_precedence(quorum):
                    return self._follow(heartbeat.node_id, heartbeat.master_term, claim)
                return [AnnounceVictory(VictoryDeclared(self.term, self.rank(last_index)))]
            case "waiting" | "follower":
                if self.master_precedence is None or claim > self.master_precedence:
                    return self._follow(heartbeat.node_id, heartbeat.master_term, claim)
                return []
            case "candidate":
                if now >= self._deadline or heartbeat.master_term >= self.term:
                    return self._follow(heartbeat.node_id, heartbeat.master_term, claim)
                return []

    # --- transitions ---------------------------------------------------------------------------

    def _takes_over_from(self, master_is_forced: bool) -> bool:
        """A forced node does not follow a master without the flag: it campaigns (and wins)."""
        return self.force_master and not master_is_forced and self.phase in ("waiting", "follower")

    def _campaign(self, now: float, last_index: int, after: int = 0) -> list[Action]:
        self._move("candidate")
        self.term = max(self.term, after) + 1
        self.master_node_id = None
        self.master_precedence = None
        self._deadline = now + self.campaign_window
        mine = self.rank(last_index)
        self._campaign_ranks = {self.node_id: mine}
        self._announced_term = self.term
        return [PersistTerm(self.term), AnnounceCampaign(CampaignStarted(self.term, mine))]

    def _win(self) -> list[Action]:
        self._move("master")
        self.master_node_id = self.node_id
        self.master_term = self.term
        self.master_precedence = None
        mine = self._campaign_ranks[self.node_id]
        return [AnnounceVictory(VictoryDeclared(self.term, mine)), BecomeMaster(self.term)]

    def _follow(self, node_id: str, term: int, claim: Precedence | None) -> list[Action]:
        actions: list[Action] = []
        if term > self.term:
            self.term = term
            actions.append(PersistTerm(term))
        self._move("follower")
        self.master_node_id = node_id
        self.master_term = term
        self.master_precedence = claim
        self._campaign_ranks = {}
        actions.append(FollowMaster(node_id, term))
        return actions

    def _move(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise AssertionError(f"election cannot go from {self.phase} to {phase}")
        self.phase = phase
