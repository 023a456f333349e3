"""Cluster changes need a majority of the members; serving does not (issue 18).

The API adapter refuses place/delete/label with ClusterUnavailable (503 and Retry-After) once it
has waited QUORUM_WAIT_SECONDS without a majority, and says in /node_status whether it sees one.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from exo.api.cluster_port import ClusterUnavailable
from exo.core import messages as m
from exo.core.events import ShardAssignment
from exo.core.state import Instance, NodeInfo, State
from exo.node import api_adapter
from exo.node.api_adapter import ClusterServices


class _Replica:
    async def wait_for(self, predicate: object, timeout: float) -> bool:
        return True


class _Member:
    """What the adapter uses of a ClusterMember: its state, quorum and the master's execute."""

    node_id = "a"
    is_master = True

    def __init__(self, quorum: bool) -> None:
        self.quorum = quorum
        self.executed: list[m.Command] = []
        self.replica = _Replica()
        nodes = {n: NodeInfo(n, "alive", 0, 0) for n in ("a", "b")}
        instance = Instance("i-1", "model", "Pipeline", "ready", {"a": ShardAssignment(0, 1, 1)})
        self.state = State(nodes=nodes, instances={"i-1": instance})

    def has_quorum(self) -> bool:
        return self.quorum

    async def execute(self, command: m.Command) -> m.CommandAnswered:
        self.executed.append(command)
        return m.CommandAnswered(m.Deleted("i-1"))


def _services(member: _Member) -> ClusterServices:
    return ClusterServices(cast(Any, member), cast(Any, None), cast(Any, None))


@pytest.fixture(autouse=True)
def _short_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_adapter, "QUORUM_WAIT_SECONDS", 0.2)


async def test_a_change_without_quorum_is_refused_with_retry_after() -> None:
    member = _Member(quorum=False)
    with pytest.raises(ClusterUnavailable, match="no quorum") as raised:
        await _services(member).delete_instance("i-1")
    assert raised.value.retry_after_s == api_adapter.QUORUM_RETRY_AFTER_SECONDS
    assert member.executed == []


async def test_a_change_waits_for_quorum_that_returns() -> None:
    member = _Member(quorum=False)

    async def heal() -> None:
        await asyncio.sleep(0.05)
        member.quorum = True

    healing = asyncio.create_task(heal())
    await _services(member).delete_instance("i-1")
    await healing
    assert member.executed == [m.DeleteInstance("i-1")]
