"""Raft's vocabulary for its shell (exo/roles/raft.py has the core): the actions it answers with,
its timings, and the membership rule (single-server changes read off the log)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from exo.core.events import Event, IndexedEvent, NodeJoined, NodeRemoved
from exo.core.raft_messages import RaftMessage

Role = Literal["follower", "pre_candidate", "candidate", "leader"]


@dataclass(frozen=True)
class Send:
    message: RaftMessage


@dataclass(frozen=True)
class PersistTerm:
    """Make (term, voted_for) durable before the next action (a vote is sent after it)."""

    term: int
    voted_for: str | None


@dataclass(frozen=True)
class WriteLog:
    """Drop stored entries after `truncate_after` (when not None), then append `entries`; report
    the write with `Raft.persisted` once it is durable."""

    truncate_after: int | None
    entries: list[IndexedEvent]


@dataclass(frozen=True)
class Apply:
    """Committed entries, in index order, never given twice."""

    entries: list[IndexedEvent]


@dataclass(frozen=True)
class RoleChanged:
    role: Role
    term: int
    leader_id: str | None


@dataclass(frozen=True)
class FetchSnapshot:
    """The master offered a snapshot this node's log is behind: fetch the state up to `index`,
    store it durably (dropping the stored entries after `index` unless `keeps_log(index, term)`),
    then call `Raft.install_snapshot(index, term, voters)`."""

    leader_id: str
    index: int
    term: int
    voters: frozenset[str]


Action = Send | PersistTerm | WriteLog | Apply | RoleChanged | FetchSnapshot


@dataclass(frozen=True)
class RaftTimings:
    """`election_timeout`: the minimum; each wait is drawn from [t, 2t). etcd's default is 1 s."""

    election_timeout: float = 1.0
    heartbeat_interval: float = 0.1
    max_entries_per_message: int = 1024
    remove_after: float | None = None  # seconds a silent voter stays a member; None: never removed


class MembershipChangePending(Exception):
    """A proposal would change the voters while another change is not committed yet."""


def voters_after(voters: frozenset[str], event: Event) -> frozenset[str]:
    match event:
        case NodeJoined(node_id=node_id) if node_id not in voters:
            return voters | {node_id}
        case NodeRemoved(node_id=node_id) if node_id in voters:
            return voters - {node_id}
        case _:
            return voters


@dataclass
class _Peer:
    next_index: int
    match_index: int = 0
    last_ack: float | None = None
