"""Paranoid Pirate liveness, sans-IO: any inbound frame from a peer counts as a heartbeat."""

from __future__ import annotations

import os

HEARTBEAT_INTERVAL = float(os.environ.get("EXO_HEARTBEAT_INTERVAL", "0.2"))
HEARTBEAT_LIVENESS = int(os.environ.get("EXO_HEARTBEAT_LIVENESS", "6"))


class Liveness:
    """Tracks when each peer was last heard; a peer silent for `interval * liveness` is dead."""

    def __init__(self, interval: float = HEARTBEAT_INTERVAL, liveness: int = HEARTBEAT_LIVENESS) -> None:
        self.timeout = interval * liveness
        self._last_heard: dict[str, float] = {}
        self._dead: set[str] = set()

    def heard(self, peer_id: str, now: float) -> bool:
        """Record a frame from `peer_id`. True when the peer is new or was dead (it just came alive)."""
        came_alive = peer_id not in self._last_heard or peer_id in self._dead
        self._last_heard[peer_id] = now
        self._dead.discard(peer_id)
        return came_alive

    def expire(self, now: float) -> list[str]:
        """Peers that went silent since the last call (each reported once until heard again)."""
        expired = [
            peer_id
            for peer_id, last in self._last_heard.items()
            if peer_id not in self._dead and now - last > self.timeout
        ]
        self._dead.update(expired)
        return sorted(expired)

    def is_alive(self, peer_id: str, now: float) -> bool:
        last = self._last_heard.get(peer_id)
        return last is not None and now - last <= self.timeout

    def heard_within(self, now: float, seconds: float) -> set[str]:
        return {peer_id for peer_id, last in self._last_heard.items() if now - last <= seconds}

    def alive(self, now: float) -> set[str]:
        return {peer_id for peer_id, last in self._last_heard.items() if now - last <= self.timeout}

    def forget(self, peer_id: str) -> None:
        self._last_heard.pop(peer_id, None)
        self._dead.discard(peer_id)
