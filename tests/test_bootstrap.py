"""Who forms a cluster and when a forced node takes the lead (exo/roles/bootstrap.py), table-tested."""

from __future__ import annotations

import pytest

from exo.core.messages import Heartbeat, Rank
from exo.roles.bootstrap import should_bootstrap, should_take_over


def heard(node_id: str, last_index: int = 0, master: str | None = None, forced: bool = False) -> Heartbeat:
    return Heartbeat(node_id, 1, master, Rank(forced, last_index, node_id), 1)


@pytest.mark.parametrize(
    ("node_id", "forced", "peers", "expected"),
    [
        ("a", False, [], True),  # nobody heard: a cluster of one
        ("a", False, [heard("b"), heard("c")], True),  # the first empty-log node by id
        ("b", False, [heard("a"), heard("c")], False),
        ("c", True, [heard("a"), heard("b")], True),  # a forced node goes first
        ("a", False, [heard("c", forced=True)], False),
        ("a", True, [heard("b", forced=True)], True),  # two forced: by id
        ("a", False, [heard("b", last_index=7)], False),  # a cluster exists: wait to be added
        ("a", True, [heard("b", master="z")], False),  # even forced: it takes over once added
    ],
)
def test_should_bootstrap(node_id: str, forced: bool, peers: list[Heartbeat], expected: bool) -> None:
    assert should_bootstrap(node_id, forced, peers) is expected


def test_a_forced_node_takes_over_only_once_its_log_holds_what_the_master_has() -> None:
    master = heard("m", last_index=40, master="m")
    assert not should_take_over(39, master, 30)
    assert not should_take_over(40, master, 41)  # the master committed more than its heartbeat said
    assert should_take_over(41, master, 41)
    assert not should_take_over(100, None, 0)  # no heartbeat from the master yet
