"""The log half of the Raft core (exo/roles/raft.py): indices and terms around the compaction base,
and the voters the log's membership changes give."""

from __future__ import annotations

from collections.abc import Iterable

from exo.core.events import IndexedEvent, NodeJoined
from exo.roles.raft_types import voters_after


class RaftLog:
    """Mixed into `Raft`, whose fields and `__post_init__` set what is declared here."""

    node_id: str
    log: list[IndexedEvent]
    base_index: int
    base_term: int
    base_voters: frozenset[str]
    bootstrap: NodeJoined | None
    commit_index: int
    _changes: list[tuple[int, frozenset[str]]]

    # --- the log -------------------------------------------------------------------------------

    @property
    def last_index(self) -> int:
        return self.base_index + len(self.log)

    @property
    def last_term(self) -> int:
        term = self.term_at(self.last_index)
        assert term is not None
        return term

    def term_at(self, index: int) -> int | None:
        if index == self.base_index:
            return self.base_term
        if self.base_index < index <= self.last_index:
            return self.log[index - self.base_index - 1].term
        return None

    def entries(self, start: int, limit: int) -> list[IndexedEvent]:
        first = max(start, self.base_index + 1) - self.base_index - 1
        return self.log[first : first + limit]

    @property
    def voters(self) -> frozenset[str]:
        voters = self._changes[-1][1] if self._changes else self.base_voters
        if not voters and self.bootstrap is not None:
            return frozenset({self.node_id})
        return voters

    def _note_change(self, voters: frozenset[str], entry: IndexedEvent) -> frozenset[str]:
        after = voters_after(voters, entry.event)
        if after != voters:
            self._changes.append((entry.index, after))
        return after

    @property
    def membership_change_allowed(self) -> bool:
        return not self._changes or self._changes[-1][0] <= self.commit_index

    def _majority(self, nodes: Iterable[str]) -> bool:
        voters = self.voters
        return len(voters & set(nodes)) * 2 > len(voters)
