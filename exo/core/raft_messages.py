"""Raft's messages (the Raft paper's figure 2), as they travel on the `election` topic.

The bus is publish/subscribe, so every message names its sender and its addressee (`to`); a node
drops what is not addressed to it. Entries are the log's own `IndexedEvent`s: they already carry
the index and the term that placed them.
"""

from __future__ import annotations

import msgspec

from exo.core.events import IndexedEvent


class _RaftMessage(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    pass


class VoteRequested(_RaftMessage, frozen=True):
    """RequestVote. `pre_vote`: a trial run for `term` that changes no one's term (Raft thesis 9.6),
    so a node back from a partition cannot depose a healthy master by bumping terms. `transfer`: a
    leadership transfer (thesis 3.10, a `--force-master` node taking over): voters answer it even
    while they hear a master; the vote itself keeps every rule (up-to-date log, one vote a term)."""

    term: int
    candidate_id: str
    to: str
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    transfer: bool = False


class VoteAnswered(_RaftMessage, frozen=True):
    term: int
    voter_id: str
    to: str
    granted: bool
    pre_vote: bool = False


class EntriesSent(_RaftMessage, frozen=True):
    """AppendEntries: `entries` continue the master's log after (`prev_index`, `prev_term`);
    empty entries are the master's heartbeat."""

    term: int
    leader_id: str
    to: str
    prev_index: int
    prev_term: int
    entries: list[IndexedEvent]
    leader_commit: int


class EntriesAcknowledged(_RaftMessage, frozen=True):
    """The follower's answer. `match_index`: the highest index it holds durably and knows equal to
    the master's (success only). `hint_index`: where the master should try next (failure only)."""

    term: int
    node_id: str
    to: str
    success: bool
    match_index: int = 0
    hint_index: int = 0


class SnapshotOffered(_RaftMessage, frozen=True):
    """InstallSnapshot (the paper's figure 13), as an offer: the follower needs entries the master
    has compacted away, so it must take the state up to `index` (whose entry has `term_at_index`
    and after which the voters are `voters`). The state itself is large and stays off this topic:
    the follower's shell fetches it and acknowledges with `EntriesAcknowledged` once installed."""

    term: int
    leader_id: str
    to: str
    index: int
    term_at_index: int
    voters: list[str]


RaftMessage = VoteRequested | VoteAnswered | EntriesSent | EntriesAcknowledged | SnapshotOffered
