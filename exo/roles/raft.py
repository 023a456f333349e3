"""Raft (the paper's figure 2, with pre-vote and check-quorum), sans-IO: feed it time, messages and
durable-write reports; it answers with actions for the shell (send, persist, write the log, apply).

Why: the log must never lose an acknowledged event. An entry is committed once a majority of the
voting members hold it *durably* (followers acknowledge what their store reports written, not what
they received), only committed entries are applied, and a master is elected only by a majority
whose logs are no more up to date than its own, so every later master holds every committed entry.

Rules beyond figure 2, each with a reason:
- Pre-vote: a node whose election timer fires first asks for votes for `term + 1` without bumping
  its term; only with a majority of grants does it run a real election. A node back from a
  partition therefore cannot depose a healthy master.
- Lease: a node that heard from a master within the minimum election timeout ignores vote requests
  (pre or real), so one flapping node cannot force elections.
- Check-quorum: a master that has not heard from a majority within an election timeout steps down,
  so a master cut off in a minority stops acknowledging anything.
- Membership is the log's: voters are the nodes joined (`NodeJoined`) minus those removed
  (`NodeRemoved`) in the log, committed or not (single-server changes, Raft thesis 4.1); a change
  is proposed only while no other is uncommitted. A master removes a voter it has not heard from
  for `remove_after` seconds. A lone voter is its own majority.
- A committed entry is never removed: a master that asks for it is a bug, raised as AssertionError.
- Compaction (`compact`) drops applied entries from memory, moving the base forward. A follower that
  needs entries before the master's base is offered a snapshot (`SnapshotOffered`); its shell fetches
  the state and calls `install_snapshot`, which keeps the log after the snapshot when it matches
  (the paper's figure 13) and drops it otherwise. A snapshot is committed state, so installing one
  never removes a committed entry.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from exo.core.events import Event, IndexedEvent, NodeJoined, NodeRemoved
from exo.core.raft_messages import (
    EntriesAcknowledged,
    EntriesSent,
    RaftMessage,
    SnapshotOffered,
    VoteAnswered,
    VoteRequested,
)
from exo.roles.raft_election import RaftElection
from exo.roles.raft_types import (
    Action,
    Apply,
    FetchSnapshot,
    MembershipChangePending,
    PersistTerm,
    RaftTimings,
    Role,
    RoleChanged,
    Send,
    WriteLog,
    _Peer,
    voters_after,
)

__all__ = [
    "Action",
    "Apply",
    "FetchSnapshot",
    "MembershipChangePending",
    "PersistTerm",
    "Raft",
    "RaftTimings",
    "Role",
    "RoleChanged",
    "Send",
    "WriteLog",
    "voters_after",
]


@dataclass
class Raft(RaftElection):
    """One node's Raft state. `log` is the durable log the node restarted with (entries after
    `base_index`, whose term is `base_term` and whose voters are `base_voters`); `applied` is what
    the shell already applied (committed by definition)."""

    node_id: str
    rng: random.Random
    now: float
    term: int = 0
    voted_for: str | None = None
    log: list[IndexedEvent] = field(default_factory=list[IndexedEvent])
    applied: int = 0
    base_index: int = 0
    base_term: int = 0
    base_voters: frozenset[str] = frozenset()
    # With no voters in the log, count this node as the only one; as master it logs this first.
    bootstrap: NodeJoined | None = None
    timings: RaftTimings = field(default_factory=RaftTimings)
    role: Role = "follower"
    leader_id: str | None = None

    def __post_init__(self) -> None:
        self.commit_index = max(self.applied, self.base_index)
        self.durable_index = self.last_index
        self._changes: list[tuple[int, frozenset[str]]] = []
        voters = self.base_voters
        for entry in self.log:
            voters = self._note_change(voters, entry)
        self._peers: dict[str, _Peer] = {}
        self._votes: set[str] = set()
        self._leader_contact: float | None = None
        self._matched_limit = 0  # entries up to here equal the current leader's
        self._leader_since = 0.0
        self._next_heartbeat = 0.0
        self._reset_election_timer()

    # --- inputs --------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        self.now = now
        actions: list[Action] = []
        if self.role == "leader":
            if now - self._leader_since >= self.timings.election_timeout and not self.has_quorum(now):
                return self._become_follower(self.term, None)  # check-quorum
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + self.timings.heartbeat_interval
                for peer in self._peers:
                    actions += self._send_append(peer, heartbeat=True)
            actions += self._remove_silent_voters(now)
        elif now >= self._election_deadline and self.node_id in self.voters:
            actions += self._start_pre_vote()
        return actions

    def has_quorum(self, now: float) -> bool:
        """Leader: a majority heard within an election timeout. Others: a master heard within one."""
        window = self.timings.election_timeout
        if self.role == "leader":
            heard = {
                node
                for node, peer in self._peers.items()
                if peer.last_ack is not None and now - peer.last_ack < window
            }
            return self._majority(heard | {self.node_id})
        return self._leader_contact is not None and now - self._leader_contact < window

    def receive(self, message: RaftMessage, now: float) -> list[Action]:
        self.now = now
        if message.to != self.node_id:
            return []
        match message:
            case VoteRequested():
                return self._on_vote_requested(message)
            case VoteAnswered():
                return self._on_vote_answered(message)
            case EntriesSent():
                return self._on_entries(message)
            case EntriesAcknowledged():
                return self._on_ack(message)
            case SnapshotOffered():
                return self._on_snapshot_offered(message)

    def persisted(self, index: int, term: int) -> list[Action]:
        """The shell's store now durably holds the log up to `index` (whose entry has `term`)."""
        if self.term_at(index) != term or index <= self.durable_index:
            return []  # superseded by a truncation, or already known
        self.durable_index = index
        if self.role == "leader":
            return self._advance_commit()
        if self.leader_id is not None:
            return [self._ack(self.leader_id, True)]
        return []

    def compact(self, index: int) -> None:
        """Drop applied entries up to `index` from memory: the base moves to `index` (its term and
        the voters after it). A follower that needs them is then offered a snapshot."""
        if index <= self.base_index:
            return
        if index > self.applied:
            raise ValueError(f"cannot compact past the applied index ({index} > {self.applied})")
        term = self.term_at(index)
        assert term is not None
        voters = self.base_voters
        while self._changes and self._changes[0][0] <= index:
            voters = self._changes.pop(0)[1]
        del self.log[: index - self.base_index]
        self.base_index, self.base_term, self.base_voters = index, term, voters

    def keeps_log(self, index: int, term: int) -> bool:
        """Whether the entries after a snapshot at (`index`, `term`) stay: the log holds that very
        entry, so by log matching everything before it equals the snapshot (figure 13, rule 6)."""
        return index <= self.last_index and self.term_at(index) == term

    def install_snapshot(self, index: int, term: int, voters: frozenset[str]) -> list[Action]:
        """The shell durably holds the state up to `index` (and dropped its stored entries after it
        unless `keeps_log`): the log restarts from there, and the master hears it."""
        if index <= self.commit_index:
            return []  # already committed here (a duplicate or stale offer)
        if self.keeps_log(index, term):
            del self.log[: index - self.base_index]
            self.durable_index = max(self.durable_index, index)
        else:
            self.log = []
            self.durable_index = index
        self.base_index, self.base_term, self.base_voters = index, term, voters
        self._changes = []
        current = voters
        for entry in self.log:
            current = self._note_change(current, entry)
        self.commit_index = self.applied = index
        self._matched_limit = max(self._matched_limit, index)  # a committed prefix matches any master
        if self.role == "follower" and self.leader_id is not None:
            return [self._ack(self.leader_id, True)]
        return []

    def propose(self, items: Sequence[tuple[str, int, Event]]) -> tuple[list[IndexedEvent], list[Action]]:
        """Leader only: append (origin, origin_sequence, event) items at the next indices."""
        assert self.role == "leader", "only the leader appends"
        voters = self.voters
        changes = 0
        for _, _, event in items:
            after = voters_after(voters, event)
            if after != voters:
                if isinstance(event, NodeRemoved) and event.node_id == self.node_id:
                    raise MembershipChangePending("the master does not remove itself")
                changes += 1
                voters = after
        if changes and (changes > 1 or not self.membership_change_allowed):
            raise MembershipChangePending("one membership change at a time")
        entries = [
            IndexedEvent(self.last_index + 1 + offset, self.term, origin, sequence, event)
            for offset, (origin, sequence, event) in enumerate(items)
        ]
        return entries, self._append_as_leader(entries)

    def step_down(self) -> list[Action]:
        """Stop leading (or campaigning) without a new term: the shell's store refuses writes. The
        node stays a voter; the shell stops ticking it while it abstains, so it does not campaign."""
        if self.role == "follower" and self.leader_id is None:
            return []
        return self._become_follower(self.term, None)

    def campaign_now(self) -> list[Action]:
        """Run a real election at once, past the pre-vote and the voters' lease (a leadership
        transfer to a `--force-master` node). It wins only with a majority of votes for a log at
        least as up to date as theirs, like any election."""
        if self.role == "leader" or self.node_id not in self.voters:
            return []
        return self._start_election(transfer=True)

    def force_remove(self, node_id: str) -> list[Action]:
        """The operator's override for a cluster that lost its majority for good (a two-node
        cluster whose other node died): take a new term without votes and append the removal.
        Unsafe if `node_id` still runs; the shell refuses it while that node answers."""
        self.term += 1
        self.voted_for = self.node_id
        actions: list[Action] = [PersistTerm(self.term, self.node_id)]
        actions += self._become_leader()
        if node_id in self.voters:
            index = self.last_index + 1
            removal = IndexedEvent(index, self.term, self.node_id, -1, NodeRemoved(node_id))
            actions += self._append_as_leader([removal])
        return actions

    # --- replication ---------------------------------------------------------------------------

    def _append_as_leader(self, entries: list[IndexedEvent]) -> list[Action]:
        if not entries:
            return []
        self._append(entries)
        for peer in sorted(self.voters - {self.node_id} - set(self._peers)):
            self._peers[peer] = _Peer(self.last_index)  # joined now: probe from the end
        actions: list[Action] = [WriteLog(None, entries)]
        for peer in self._peers:
            actions += self._send_append(peer)
        return actions + self._advance_commit()

    def _append(self, entries: Sequence[IndexedEvent]) -> None:
        voters = self._changes[-1][1] if self._changes else self.base_voters
        for entry in entries:
            assert entry.index == self.last_index + 1, "the log continues without a gap"
            self.log.append(entry)
            voters = self._note_change(voters, entry)

    def _truncate_after(self, index: int) -> None:
        assert index >= self.commit_index, f"a committed entry ({index + 1}) is never removed"
        del self.log[index - self.base_index :]
        while self._changes and self._changes[-1][0] > index:
            self._changes.pop()
        self.durable_index = min(self.durable_index, index)

    def _send_append(self, peer: str, heartbeat: bool = False) -> list[Action]:
        state = self._peers[peer]
        if state.next_index > self.last_index and not heartbeat:
            return []
        prev = min(state.next_index - 1, self.last_index)
        prev_term = self.term_at(prev)
        if prev_term is None:  # behind the base: the entries it needs are compacted away
            voters = sorted(self.base_voters)
            offer = SnapshotOffered(self.term, self.node_id, peer, self.base_index, self.base_term, voters)
            return [Send(offer)]
        entries = self.entries(prev + 1, self.timings.max_entries_per_message)
        state.next_index = prev + 1 + len(entries)  # optimistic: a failure answer rewinds it
        message = EntriesSent(self.term, self.node_id, peer, prev, prev_term, entries, self.commit_index)
        return [Send(message)]

    def _on_entries(self, message: EntriesSent) -> list[Action]:
        if message.term < self.term:
            return [Send(EntriesAcknowledged(self.term, self.node_id, message.leader_id, False))]
        actions: list[Action] = []
        if message.term > self.term or self.role != "follower" or self.leader_id != message.leader_id:
            actions += self._become_follower(message.term, message.leader_id)
        self._leader_contact = self.now
        self._reset_election_timer()
        prev_term = self.term_at(message.prev_index)
        if message.prev_index > self.last_index or (prev_term is not None and prev_term != message.prev_term):
            hint = self.last_index
            if message.prev_index <= self.last_index:
                hint = message.prev_index - 1
                while hint > self.commit_index and self.term_at(hint) == prev_term:
                    hint -= 1  # skip the whole conflicting term in one round trip
            refusal = EntriesAcknowledged(self.term, self.node_id, message.leader_id, False, hint_index=hint)
            return [*actions, Send(refusal)]
        new: list[IndexedEvent] = []
        truncate: int | None = None
        for entry in message.entries:
            if entry.index <= self.base_index:
                continue
            if not new and entry.index <= self.last_index:
                if self.term_at(entry.index) == entry.term:
                    continue
                truncate = entry.index - 1
                self._truncate_after(truncate)
            new.append(entry)
        if new:
            self._append(new)
            actions.append(WriteLog(truncate, new))
        self._matched_limit = message.prev_index + len(message.entries)
        commit = min(message.leader_commit, self._matched_limit)
        actions += self._commit_to(commit)
        actions.append(self._ack(message.leader_id, True))
        return actions

    def _on_snapshot_offered(self, message: SnapshotOffered) -> list[Action]:
        if message.term < self.term:
            return [Send(EntriesAcknowledged(self.term, self.node_id, message.leader_id, False))]
        actions: list[Action] = []
        if message.term > self.term or self.role != "follower" or self.leader_id != message.leader_id:
            actions += self._become_follower(message.term, message.leader_id)
        self._leader_contact = self.now
        self._reset_election_timer()
        if message.index <= self.commit_index:
            self._matched_limit = max(self._matched_limit, message.index)
            return [*actions, self._ack(message.leader_id, True)]
        fetch = FetchSnapshot(
            message.leader_id, message.index, message.term_at_index, frozenset(message.voters)
        )
        return [*actions, fetch]

    def _ack(self, leader_id: str, success: bool) -> Send:
        match = min(self.durable_index, self._matched_limit)
        return Send(EntriesAcknowledged(self.term, self.node_id, leader_id, success, match_index=match))

    def _on_ack(self, ack: EntriesAcknowledged) -> list[Action]:
        if ack.term > self.term:
            return self._become_follower(ack.term, None)
        if ack.term < self.term or self.role != "leader" or ack.node_id not in self._peers:
            return []
        peer = self._peers[ack.node_id]
        peer.last_ack = self.now
        if ack.success:
            peer.match_index = max(peer.match_index, ack.match_index)
            peer.next_index = max(peer.next_index, peer.match_index + 1)
            return self._advance_commit() + self._send_append(ack.node_id)
        peer.next_index = max(peer.match_index + 1, min(peer.next_index - 1, ack.hint_index + 1))
        return self._send_append(ack.node_id, heartbeat=True)

    def _advance_commit(self) -> list[Action]:
        matches = [peer.match_index for node, peer in self._peers.items() if node in self.voters]
        if self.node_id in self.voters:
            matches.append(self.durable_index)
        matches.sort(reverse=True)
        needed = len(self.voters) // 2  # position of the majority's lowest match
        if needed >= len(matches):
            return []
        candidate = matches[needed]
        if candidate > self.commit_index and self.term_at(candidate) == self.term:
            actions = self._commit_to(candidate)
            # Tell the followers now rather than at the next heartbeat: they apply on hearing it.
            for peer in self._peers:
                actions += self._send_append(peer, heartbeat=True)
            return actions
        return []

    def _commit_to(self, index: int) -> list[Action]:
        if index <= self.commit_index:
            return []
        self.commit_index = index
        start = self.applied + 1
        entries = self.entries(start, index - self.applied)
        self.applied = index
        return [Apply(entries)] if entries else []

    def _remove_silent_voters(self, now: float) -> list[Action]:
        limit = self.timings.remove_after
        if limit is None or now - self._leader_since < limit or not self.membership_change_allowed:
            return []
        for node in sorted(self.voters - {self.node_id}):
            peer = self._peers.get(node)
            if peer is not None and (peer.last_ack is None or now - peer.last_ack > limit):
                _, actions = self.propose([(self.node_id, -1, NodeRemoved(node))])
                return actions
        return []
