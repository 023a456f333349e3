"""Responses kept on this node for `previous_response_id`, `GET /v1/responses/{id}` and input items.

Node-local and in memory, never in the event log: a response is a client's conversation, not
cluster state. Bounded by entry count, by approximate bytes and by age (a TTL from the last write),
so a client that never deletes cannot grow the node's memory. The oldest entries go first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from exo.api.openai_types import ChatMessage
from exo.api.responses_types import ResponseObject

DEFAULT_MAX_ENTRIES = 1000
DEFAULT_TTL_S = 3600.0
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class StoredResponse(msgspec.Struct, frozen=True, kw_only=True):
    response: ResponseObject
    input_items: list[dict[str, Any]]  # this request's input, as GET .../input_items lists it
    # The conversation a follow-up continues: earlier turns, this input and this output
    # (instructions excluded: OpenAI does not carry them over to the next response).
    conversation: list[ChatMessage]
    size: int = 0  # approximate bytes, for the store's byte bound


class _Entry(msgspec.Struct):
    stored: StoredResponse
    written_at: float


class ResponseStore:
    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        ttl_s: float = DEFAULT_TTL_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl_s <= 0 or max_bytes < 1:
            raise ValueError("a response store needs max_entries >= 1, ttl_s > 0 and max_bytes >= 1")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest write first
        self._bytes = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, response_id: str, stored: StoredResponse) -> None:
        """Add or replace; the entry's TTL starts again. Older entries leave to keep the bounds."""
        self._remove(response_id)
        self._entries[response_id] = _Entry(stored, self._clock())
        self._bytes += stored.size
        self._expire()
        while len(self._entries) > self.max_entries or (
            self._bytes > self.max_bytes and len(self._entries) > 1
        ):
            self._remove(next(iter(self._entries)))

    def get(self, response_id: str) -> StoredResponse | None:
        self._expire()
        entry = self._entries.get(response_id)
        return None if entry is None else entry.stored

    def delete(self, response_id: str) -> bool:
        self._expire()
        return self._remove(response_id)

    def _remove(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._bytes -= entry.stored.size
        return True

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_s
        while self._entries:
            oldest_id, oldest = next(iter(self._entries.items()))
            if oldest.written_at > deadline:
                return
            self._remove(oldest_id)
