"""The dashboard's live feed: state changes pushed to every open page as they are applied.

The node calls `LiveFeed.publish(events)` from its replica's applied hook (on the event loop); each
client of `GET /v1/dashboard/stream` holds a small bounded queue. A slow page never holds the node
up: when its queue is full the page is marked behind and gets the whole state again on its next
read instead of the events it missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Final

from exo.core.events import IndexedEvent, MasterElected

CLIENT_QUEUE_BATCHES: Final = 64
MAX_CLIENTS: Final = 64


class FeedClosed(Exception):
    """The feed has too many clients (or is closed): the page should retry later."""


class FeedClient:
    """One page's queue of applied batches; `behind` when batches were dropped for it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Sequence[IndexedEvent]] = asyncio.Queue(CLIENT_QUEUE_BATCHES)
        self.behind = False
        self.wakeup = asyncio.Event()

    def offer(self, events: Sequence[IndexedEvent]) -> None:
        try:
            self.queue.put_nowait(events)
        except asyncio.QueueFull:
            self.behind = True
        self.wakeup.set()

    def drain(self) -> list[IndexedEvent]:
        """Every queued event, oldest first (empty when none)."""
        drained: list[IndexedEvent] = []
        while not self.queue.empty():
            drained.extend(self.queue.get_nowait())
        self.wakeup.clear()
        return drained


class LiveFeed:
    """Fan-out of applied events to the open dashboards, and a count of what went through."""

    def __init__(self) -> None:
        self._clients: set[FeedClient] = set()
        self.events_applied = 0
        self.elections = 0

    def __len__(self) -> int:
        return len(self._clients)

    def publish(self, events: Sequence[IndexedEvent]) -> None:
        """Called once per applied run of events; O(clients), never blocks."""
        self.events_applied += len(events)
        self.elections += sum(1 for indexed in events if isinstance(indexed.event, MasterElected))
        for client in self._clients:
            client.offer(events)

    def join(self) -> FeedClient:
        if len(self._clients) >= MAX_CLIENTS:
            raise FeedClosed(f"too many open dashboards (at most {MAX_CLIENTS})")
        client = FeedClient()
        self._clients.add(client)
        return client

    def leave(self, client: FeedClient) -> None:
        self._clients.discard(client)
