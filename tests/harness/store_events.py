"""Indexed events for the store tests (also imported by the writer they kill in a subprocess)."""

from __future__ import annotations

from exo.core.events import IndexedEvent, NodeLabelled


def events(start: int, stop: int) -> list[IndexedEvent]:
    """Indexed events start..stop inclusive."""
    return [
        IndexedEvent(index, 1, "node0", index, NodeLabelled("node0", "step", str(index)))
        for index in range(start, stop + 1)
    ]
