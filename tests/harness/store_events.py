"""Indexed events for the store tests (also imported by the writer they kill in a subprocess)."""

from __future__ import annotations

import contextlib

from exo.core.decoding import DECODE_ERRORS
from exo.core.events import IndexedEvent, NodeLabelled, indexed_event_decoder


def events(start: int, stop: int) -> list[IndexedEvent]:
    """Indexed events start..stop inclusive."""
    return [
        IndexedEvent(index, 1, "node0", index, NodeLabelled("node0", "step", str(index)))
        for index in range(start, stop + 1)
    ]


def flip_one_byte_keeping_it_decodable(payload: bytes) -> bytes:
    """The payload with one byte of a string changed so that it still decodes as an event."""
    for position in range(len(payload) - 1, -1, -1):
        if chr(payload[position]).isalnum():
            changed = payload[:position] + bytes([payload[position] ^ 0x01]) + payload[position + 1 :]
            with contextlib.suppress(*DECODE_ERRORS):
                indexed_event_decoder.decode(changed)
                return changed
    raise AssertionError("no byte of the payload can change and still decode")
