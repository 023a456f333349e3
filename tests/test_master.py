"""The master facade (exo/node/master.py) over a fake Raft: de-duplication before proposing,
answers on apply, refusals when it stops leading or a second voter change is proposed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from exo.core.events import Event, IndexedEvent, NodeJoined, NodeLabelled
from exo.core.messages import LocalEvent
from exo.node.master import Master, NotLeading
from exo.roles.raft import MembershipChangePending
from exo.roles.sequencer import OriginHighWater, Sequencer


class FakeRaft:
    def __init__(self) -> None:
        self.log: list[IndexedEvent] = []
        self.grew = asyncio.Event()

    def propose(self, items: Sequence[tuple[str, int, Event]]) -> list[IndexedEvent]:
        if sum(isinstance(event, NodeJoined) for _, _, event in items) > 1:
            raise MembershipChangePending("one membership change at a time")
        entries = [
            IndexedEvent(len(self.log) + offset + 1, 3, origin, sequence, event)
            for offset, (origin, sequence, event) in enumerate(items)
        ]
        self.log += entries
        self.grew.set()
        return entries


async def always_room() -> None:
    return None


async def started() -> tuple[Master, FakeRaft]:
    raft = FakeRaft()
    master = Master(Sequencer("m", 3, 0, OriginHighWater()), raft.propose, always_room)
    master.start()
    return master, raft


async def until_proposed(raft: FakeRaft, count: int) -> None:
    async with asyncio.timeout(5):
        while len(raft.log) < count:
            raft.grew.clear()
            await raft.grew.wait()


async def test_resent_local_events_are_proposed_once_and_own_events_answered_on_apply() -> None:
    master, raft = await started()
    batch = [LocalEvent(1, NodeLabelled("a", "k", "1")), LocalEvent(2, NodeLabelled("a", "k", "2"))]
    master.submit_local("a", batch)
    master.submit_local("a", batch)  # a resend
    answer = master.submit_own([NodeLabelled("m", "k", "own")])
    await until_proposed(raft, 3)
    assert [(entry.origin_node_id, entry.origin_sequence) for entry in raft.log] == [
        ("a", 1),
        ("a", 2),
        ("m", -1),
    ]
    assert not answer.done()  # proposed, not committed
    master.applied(2)
    await asyncio.sleep(0)
    assert not answer.done()
    master.applied(3)
    assert await answer == 3
    await master.stop()


async def test_stepping_down_refuses_every_waiter() -> None:
    master, raft = await started()
    answer = master.submit_own([NodeLabelled("m", "k", "v")])
    await until_proposed(raft, 1)
    master.cancel()
    with pytest.raises(NotLeading):
        await answer
    await master.stop()


async def test_a_second_voter_change_in_one_proposal_is_refused() -> None:
    master, _ = await started()
    answer = master.submit_own([NodeJoined("x", "x:1"), NodeJoined("y", "y:1")])
    with pytest.raises(MembershipChangePending):
        await answer
    await master.stop()
