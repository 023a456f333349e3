"""The election half of the Raft core (exo/roles/raft.py): pre-vote, votes, the lease, and the
role changes."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from exo.core.events import Event, IndexedEvent, MasterElected
from exo.core.raft_messages import VoteAnswered, VoteRequested
from exo.roles.raft_log import RaftLog
from exo.roles.raft_types import Action, PersistTerm, RaftTimings, Role, RoleChanged, Send, _Peer


class RaftElection(RaftLog):
    """Mixed into `Raft`, whose fields and `__post_init__` set what is declared here."""

    rng: random.Random
    now: float
    term: int
    voted_for: str | None
    timings: RaftTimings
    role: Role
    leader_id: str | None
    _peers: dict[str, _Peer]
    _votes: set[str]
    _leader_contact: float | None
    _matched_limit: int
    _leader_since: float
    _next_heartbeat: float
    _election_deadline: float

    if TYPE_CHECKING:

        def has_quorum(self, now: float) -> bool: ...

        def _append_as_leader(self, entries: list[IndexedEvent]) -> list[Action]: ...

    # --- election --------------------------------------------------------------------------------

    def _reset_election_timer(self) -> None:
        timeout = self.timings.election_timeout
        self._election_deadline = self.now + timeout + self.rng.random() * timeout

    def _log_up_to_date(self, last_term: int, last_index: int) -> bool:
        return (last_term, last_index) >= (self.last_term, self.last_index)

    def _in_lease(self) -> bool:
        if self.role == "leader":
            return self.has_quorum(self.now)
        contact = self._leader_contact
        return (
            self.leader_id is not None
            and contact is not None
            and self.now - contact < self.timings.election_timeout
        )

    def _start_pre_vote(self) -> list[Action]:
        self.role = "pre_candidate"
        self.leader_id = None
        self._votes = {self.node_id}
        self._reset_election_timer()
        if self._majority(self._votes):
            return self._start_election()
        return [
            Send(
                VoteRequested(
                    self.term + 1, self.node_id, peer, self.last_index, self.last_term, pre_vote=True
                )
            )
            for peer in sorted(self.voters - {self.node_id})
        ]

    def _start_election(self, transfer: bool = False) -> list[Action]:
        self.role = "candidate"
        self.term += 1
        self.voted_for = self.node_id
        self._votes = {self.node_id}
        self._reset_election_timer()
        actions: list[Action] = [
            PersistTerm(self.term, self.node_id),
            RoleChanged("candidate", self.term, None),
        ]
        if self._majority(self._votes):
            return actions + self._become_leader()
        actions += [
            Send(
                VoteRequested(
                    self.term, self.node_id, peer, self.last_index, self.last_term, transfer=transfer
                )
            )
            for peer in sorted(self.voters - {self.node_id})
        ]
        return actions

    def _on_vote_requested(self, request: VoteRequested) -> list[Action]:
        if self._in_lease() and request.candidate_id != self.leader_id and not request.transfer:
            return []  # a master is alive: the candidate is the one cut off
        up_to_date = self._log_up_to_date(request.last_log_term, request.last_log_index)
        if request.pre_vote:
            granted = request.term > self.term and up_to_date
            term = request.term if granted else self.term
            return [Send(VoteAnswered(term, self.node_id, request.candidate_id, granted, pre_vote=True))]
        actions: list[Action] = []
        if request.term > self.term:
            actions += self._become_follower(request.term, None)
        granted = request.term == self.term and self.voted_for in (None, request.candidate_id) and up_to_date
        if granted:
            self.voted_for = request.candidate_id
            self._reset_election_timer()
            actions.append(PersistTerm(self.term, self.voted_for))
        actions.append(Send(VoteAnswered(self.term, self.node_id, request.candidate_id, granted)))
        return actions

    def _on_vote_answered(self, answer: VoteAnswered) -> list[Action]:
        if answer.term > self.term and not (answer.pre_vote and answer.granted):
            return self._become_follower(answer.term, None)
        if not answer.granted or answer.voter_id not in self.voters:
            return []
        if answer.pre_vote and self.role == "pre_candidate" and answer.term == self.term + 1:
            self._votes.add(answer.voter_id)
            return self._start_election() if self._majority(self._votes) else []
        if not answer.pre_vote and self.role == "candidate" and answer.term == self.term:
            self._votes.add(answer.voter_id)
            return self._become_leader() if self._majority(self._votes) else []
        return []

    def _become_follower(self, term: int, leader_id: str | None) -> list[Action]:
        actions: list[Action] = []
        if term > self.term:
            self.term = term
            self.voted_for = None
            actions.append(PersistTerm(term, None))
        changed = self.role != "follower" or self.leader_id != leader_id
        if changed or actions:
            self._matched_limit = 0  # what matched another leader says nothing about this one
        self.role = "follower"
        self.leader_id = leader_id
        self._peers = {}
        if changed:
            actions.append(RoleChanged("follower", self.term, leader_id))
        return actions

    def _become_leader(self) -> list[Action]:
        self.role = "leader"
        self.leader_id = self.node_id
        self._leader_since = self.now
        self._next_heartbeat = self.now
        self._peers = {peer: _Peer(self.last_index + 1) for peer in sorted(self.voters - {self.node_id})}
        actions: list[Action] = [RoleChanged("leader", self.term, self.node_id)]
        # An entry of its own term lets the master commit what earlier terms left uncommitted.
        events: list[Event] = [MasterElected(self.term, self.node_id)]
        if self.bootstrap is not None and not (self._changes[-1][1] if self._changes else self.base_voters):
            events.append(self.bootstrap)  # the log says who the first voter is, for every node
        first = [
            IndexedEvent(self.last_index + 1 + offset, self.term, self.node_id, -1, event)
            for offset, event in enumerate(events)
        ]
        return actions + self._append_as_leader(first)
