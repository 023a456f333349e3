"""The master: the only sequencer. Next index -> durable in the store -> applied -> published.

`exo.roles.membership` decides which node events liveness implies; `Master` is the shell that
batches local events into group commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from exo.core.events import Event, IndexedEvent
from exo.core.messages import LocalEvent
from exo.node.replica import Replica
from exo.roles.sequencer import Sequencer

logger = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 1024
INCOMING_QUEUE_BATCHES = 10_000


@dataclass(frozen=True)
class _OwnEvents:
    events: list[Event]
    committed: asyncio.Future[int]


_Incoming = tuple[str, list[LocalEvent]] | _OwnEvents


class Master:
    def __init__(
        self,
        sequencer: Sequencer,
        replica: Replica,
        publish: Callable[[Sequence[IndexedEvent]], None],
    ) -> None:
        self.sequencer = sequencer
        self.replica = replica
        self._publish = publish
        self._incoming: asyncio.Queue[_Incoming] = asyncio.Queue(INCOMING_QUEUE_BATCHES)
        self._task: asyncio.Task[None] | None = None
        self.dropped_batches = 0

    @property
    def queue_depth(self) -> int:
        return self._incoming.qsize()

    @property
    def term(self) -> int:
        return self.sequencer.term

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="master-sequencer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit_local(self, origin: str, events: list[LocalEvent]) -> None:
        self._offer((origin, events))

    def submit_own(self, events: list[Event]) -> asyncio.Future[int]:
        """Sequence the master's own events; the future gives the last index once they are applied."""
        committed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not events:
            committed.set_result(self.replica.last_index)
        elif not self._offer(_OwnEvents(events, committed)):
            committed.set_exception(OverflowError("the master's queue is full"))
        return committed

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
            waiting: list[asyncio.Future[int]] = []
            batch = self._sequence(await self._incoming.get(), waiting)
            while len(batch) < MAX_BATCH_EVENTS and not self._incoming.empty():
                batch.extend(self._sequence(self._incoming.get_nowait(), waiting))
            if not batch:
                continue
            try:
                await self.replica.commit(batch)
            except Exception as error:
                # Not durable: roll the sequencer back so the indices are reused, and let origins resend.
                logger.exception("could not store %d events; they will be resent", len(batch))
                self.sequencer.rewind(
                    self.replica.last_index, self.replica.high_water.copy(), self.replica.state.instances
                )
                for future in waiting:
                    if not future.done():
                        future.set_exception(error)
                continue
            self._publish(batch)
            for future in waiting:
                if not future.done():
                    future.set_result(self.replica.last_index)

    def _sequence(self, item: _Incoming, waiting: list[asyncio.Future[int]]) -> list[IndexedEvent]:
        if isinstance(item, _OwnEvents):
            waiting.append(item.committed)
            return self.sequencer.sequence_own(item.events)
        origin, local_events = item
        return self.sequencer.sequence(origin, local_events)
