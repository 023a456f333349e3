"""The master's sequencing, on top of Raft: origin de-duplication, then the Raft core appends.

`Sequencer` (exo/roles/sequencer.py) drops what an origin resent and runner statuses of deleted
instances; what is left is proposed to the core (exo/node/raft_member.py), which assigns the
indices. A waiter (a command) is answered once Raft applied its last index here, i.e. once a
majority holds it durably; when this node stops leading, every waiter is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from exo.core.events import Event, IndexedEvent
from exo.core.messages import LocalEvent
from exo.roles.raft import MembershipChangePending
from exo.roles.sequencer import Sequencer

logger = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 1024
INCOMING_QUEUE_BATCHES = 10_000

Propose = Callable[[Sequence[tuple[str, int, Event]]], list[IndexedEvent]]


class NotLeading(Exception):
    """This node stopped leading before the events were committed (they may or may not be)."""


@dataclass(frozen=True)
class _OwnEvents:
    events: list[Event]
    committed: asyncio.Future[int]


_Incoming = tuple[str, list[LocalEvent]] | _OwnEvents


class Master:
    def __init__(self, sequencer: Sequencer, propose: Propose, room: Callable[[], Awaitable[None]]) -> None:
        """`room`: waits while the node's disk is behind (no more proposals until it catches up)."""
        self.sequencer = sequencer
        self._propose = propose
        self._room = room
        self._incoming: asyncio.Queue[_Incoming] = asyncio.Queue(INCOMING_QUEUE_BATCHES)
        self._waiting: list[tuple[int, asyncio.Future[int]]] = []
        self._task: asyncio.Task[None] | None = None
        self.dropped_batches = 0
        self.last_proposed = 0

    @property
    def queue_depth(self) -> int:
        return self._incoming.qsize()

    @property
    def term(self) -> int:
        return self.sequencer.term

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="master-sequencer")

    def cancel(self) -> None:
        """Stop proposing now (this node no longer leads): the task cannot propose again, and every
        waiter is refused."""
        if self._task is not None:
            self._task.cancel()
        self._fail_all()

    async def stop(self) -> None:
        self.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _fail_all(self) -> None:
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(NotLeading("this node stopped leading"))
        self._waiting.clear()
        while not self._incoming.empty():
            item = self._incoming.get_nowait()
            if isinstance(item, _OwnEvents) and not item.committed.done():
                item.committed.set_exception(NotLeading("this node stopped leading"))

    def submit_local(self, origin: str, events: list[LocalEvent]) -> None:
        self._offer((origin, events))

    def submit_own(self, events: list[Event]) -> asyncio.Future[int]:
        """Propose the master's own events; the future gives the last index once it is committed
        and applied here (NotLeading, MembershipChangePending or OverflowError otherwise)."""
        committed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not events:
            committed.set_result(self.last_proposed)
        elif not self._offer(_OwnEvents(events, committed)):
            committed.set_exception(OverflowError("the master's queue is full"))
        return committed

    def applied(self, index: int) -> None:
        """Raft applied up to `index` here: answer the waiters it covers."""
        while self._waiting and self._waiting[0][0] <= index:
            _, future = self._waiting.pop(0)
            if not future.done():
                future.set_result(index)

    def _offer(self, item: _Incoming) -> bool:
        try:
            self._incoming.put_nowait(item)
        except asyncio.QueueFull:
            # The origin resends what it does not see applied; the master never blocks the bus.
            self.dropped_batches += 1
            return False
        return True

    async def _run(self) -> None:
        while True:
            items = [await self._incoming.get()]
            await self._room()
            count = 0
            while count < MAX_BATCH_EVENTS and not self._incoming.empty():
                items.append(self._incoming.get_nowait())
                count += 1
            local: list[tuple[str, int, Event]] = []
            for item in items:
                if isinstance(item, _OwnEvents):
                    self._propose_local(local)
                    local = []
                    self._propose_own(item)
                else:
                    origin, events = item
                    local += [
                        (e.origin_node_id, e.origin_sequence, e.event)
                        for e in self.sequencer.sequence(origin, events)
                    ]
            self._propose_local(local)

    def _propose_own(self, item: _OwnEvents) -> None:
        sequenced = self.sequencer.sequence_own(item.events)
        try:
            entries = self._propose([(self.sequencer.node_id, -1, e.event) for e in sequenced])
        except MembershipChangePending as error:
            item.committed.set_exception(error)
            return
        self.last_proposed = entries[-1].index
        self._waiting.append((entries[-1].index, item.committed))

    def _propose_local(self, items: list[tuple[str, int, Event]]) -> None:
        if not items:
            return
        try:
            entries = self._propose(items)
        except MembershipChangePending:
            entries = []
            for one in items:  # a node's own events may not change the voters twice at once
                try:
                    entries += self._propose([one])
                except MembershipChangePending:
                    logger.warning("dropped %s from %s: a membership change is in progress", one[2], one[0])
        if entries:
            self.last_proposed = entries[-1].index
