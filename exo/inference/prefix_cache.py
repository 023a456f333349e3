"""Prefix KV cache: a finished request's cache, kept so a later prompt that starts the same way
(the next turn of a chat) skips that part of its prefill on every stage.

Only the first stage sees token ids, so it alone decides, with `PrefixIndex` (sans-IO: token
sequences, routes, a token budget, least recently used first). Every stage holds the arrays, in
`KVSnapshots`, keyed by entry id (the id of the request whose cache it was) and changed only when
the first stage says so (`PrefixCached` frames, which travel the route in order with everything
else the first stage sends). An entry is used only after the last stage confirmed it holds it, so
a hit is consistent on every stage of the route.

The budget is in tokens, the same on every stage; a stage's bytes per token are
2 x layers x kv_heads x head_dim x item size (see `KVSnapshots.nbytes`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.core as mx
import msgspec
import numpy as np
from mlx_lm.models.cache import KVCache

from exo.inference.protocol import PrefixCacheConfirmed, PrefixCached


class PrefixHit(NamedTuple):
    entry_id: str
    tokens: int  # prompt positions to take from the entry


class StorePlan(NamedTuple):
    tokens: int  # positions of the finished request to keep (0: none)
    evicted: list[str]


@dataclass
class _IndexEntry:
    route: tuple[str, ...]
    tokens: np.ndarray  # the token ids whose keys and values the entry holds
    confirmed: bool


def common_prefix_length(first: np.ndarray, second: np.ndarray) -> int:
    length = min(len(first), len(second))
    different = np.flatnonzero(first[:length] != second[:length])
    return int(different[0]) if different.size else length


class PrefixIndex:
    """The first stage's view: which token sequences are cached for which route."""

    def __init__(self, budget_tokens: int, min_reuse_tokens: int = 1) -> None:
        if budget_tokens < 0 or min_reuse_tokens < 1:
            raise ValueError("budget_tokens must be >= 0 and min_reuse_tokens >= 1")
        self.budget_tokens = budget_tokens
        self.min_reuse_tokens = min_reuse_tokens
        self._entries: OrderedDict[str, _IndexEntry] = OrderedDict()  # least recently used first
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def lookup(self, route: Sequence[str], prompt: Sequence[int]) -> PrefixHit | None:
        """The confirmed entry sharing the longest prefix with `prompt` on this route. At least the
        last prompt token is always computed (its logits give the first token)."""
        wanted = np.asarray(prompt, dtype=np.int64)
        best: PrefixHit | None = None
        route_key = tuple(route)
        for entry_id, entry in self._entries.items():
            if not entry.confirmed or entry.route != route_key:
                continue
            usable = min(common_prefix_length(entry.tokens, wanted), len(wanted) - 1)
            if usable >= self.min_reuse_tokens and (best is None or usable > best.tokens):
                best = PrefixHit(entry_id, usable)
        if best is not None:
            self._entries.move_to_end(best.entry_id)
        return best

    def plan_store(self, entry_id: str, route: Sequence[str], tokens: Sequence[int]) -> StorePlan:
        """Decide whether a finished request's cache (holding `tokens`) becomes an entry, and what
        goes to make room. The entry is unconfirmed until `confirm`."""
        if entry_id in self._entries:
            raise ValueError(f"prefix cache entry {entry_id!r} exists")
        key = np.asarray(tokens, dtype=np.int64)
        route_key = tuple(route)
        if not 0 < len(key) <= self.budget_tokens:
            return StorePlan(0, [])
        same_route = [
            (other_id, other) for other_id, other in self._entries.items() if other.route == route_key
        ]
        if any(common_prefix_length(other.tokens, key) == len(key) for _, other in same_route):
            return StorePlan(0, [])  # an entry already holds all of it
        # Entries this one extends are redundant; then the least recently used, until it fits.
        evicted = [
            other_id
            for other_id, other in same_route
            if common_prefix_length(other.tokens, key) == len(other.tokens)
        ]
        for other_id in evicted:
            self._remove(other_id)
        while self.tokens + len(key) > self.budget_tokens:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            evicted.append(oldest)
        self._entries[entry_id] = _IndexEntry(route_key, key, confirmed=False)
        self.tokens += len(key)
        return StorePlan(len(key), evicted)

    @property
    def confirmed(self) -> int:
        return sum(entry.confirmed for entry in self._entries.values())

    def confirm(self, entry_id: str) -> bool:
        entry = self._entries.get(entry_id)
        if entry is None:
            return False
        entry.confirmed = True
        return True

    def forget(self, entry_id: str) -> None:
        if entry_id in self._entries:
            self._remove(entry_id)

    def _remove(self, entry_id: str) -> None:
        self.tokens -= len(self._entries.pop(entry_id).tokens)


class KVSnapshots:
    """A stage's copies of cached prefixes: entry id -> per-layer (keys, values), trimmed."""

    def __init__(self) -> None:
        self._entries: dict[str, list[tuple[mx.array, mx.array]]] = {}
        self.tokens: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    @property
    def nbytes(self) -> int:
        return sum(
            keys.nbytes + values.nbytes for layers in self._entries.values() for keys, values in layers
        )

    def save(self, entry_id: str, cache: Sequence[Any], tokens: int) -> bool:
        """Keep the first `tokens` positions of a request's per-layer caches (copied, so the
        buffers grown for later tokens are not held); False when the cache is shorter."""
        if tokens < 1 or any(layer.keys is None or layer.offset < tokens for layer in cache):
            return False
        layers = [
            (mx.contiguous(layer.keys[..., :tokens, :]), mx.contiguous(layer.values[..., :tokens, :]))
            for layer in cache
        ]
        mx.eval(layers)
        self._entries[entry_id] = layers
        self.tokens[entry_id] = tokens
        return True

    def restore(self, entry_id: str, tokens: int) -> list[KVCache] | None:
        """Fresh per-layer caches holding the entry's first `tokens` positions, or None. The entry's
        arrays are shared, never written: a cache grows by concatenating into a new buffer."""
        layers = self._entries.get(entry_id)
        if layers is None or not 0 < tokens <= self.tokens[entry_id]:
            return None
        caches: list[KVCache] = []
        for keys, values in layers:
            cache = KVCache()
            cache.keys, cache.values = keys[..., :tokens, :], values[..., :tokens, :]
            cache.offset = tokens
            caches.append(cache)
        return caches

    def drop(self, entry_ids: Sequence[str]) -> None:
        for entry_id in entry_ids:
            self._entries.pop(entry_id, None)
            self.tokens.pop(entry_id, None)


class StagePrefixCache:
    """One stage's part of the protocol: the first stage's index and decisions, every stage's
    snapshots, and (last stage) finished requests' caches parked until the first stage decides."""

    def __init__(self, *, first: bool, budget_tokens: int, max_parked: int) -> None:
        self.index = PrefixIndex(budget_tokens) if first and budget_tokens > 0 else None
        self.snapshots = KVSnapshots()
        self._parked: OrderedDict[str, list[Any]] = OrderedDict()
        self._max_parked = max_parked

    def __contains__(self, request_id: object) -> bool:
        """A finished request still parked here."""
        return request_id in self._parked

    @property
    def parked(self) -> int:
        return len(self._parked)

    def usable_entries(self) -> int:
        """Entries a hit may use: on the first stage, those every stage confirmed."""
        return self.index.confirmed if self.index is not None else len(self.snapshots)

    def hit(self, route: Sequence[str], prompt: Sequence[int]) -> tuple[PrefixHit, list[KVCache]] | None:
        """First stage: the best confirmed entry for this prompt, and caches restored from it."""
        hit = self.index.lookup(route, prompt) if self.index is not None else None
        cache = self.snapshots.restore(hit.entry_id, hit.tokens) if hit is not None else None
        return (hit, cache) if hit is not None and cache is not None else None

    def store(
        self, request_id: str, route: Sequence[str], tokens: Sequence[int], cache: Sequence[Any]
    ) -> PrefixCached | None:
        """First stage, a request that ended normally: its cache holds `tokens`. Decide, keep it
        here, and return what the next stage must do (None with one stage: usable at once)."""
        assert self.index is not None
        plan = self.index.plan_store(request_id, route, tokens)
        self.snapshots.drop(plan.evicted)
        kept = plan.tokens
        if kept and not self.snapshots.save(request_id, cache, kept):
            self.index.forget(request_id)
            kept = 0
        if len(route) == 1:
            if kept:
                self.index.confirm(request_id)
            return None
        return PrefixCached(
            request_id=request_id, route=list(route), stage_index=1, tokens=kept, evicted=plan.evicted
        )

    def park(self, request_id: str, cache: list[Any]) -> None:
        """Last stage: keep a finished request's cache until the first stage's PrefixCached (or a
        cancel) says what to do with it; the oldest go past `max_parked` (never confirmed then)."""
        self._parked[request_id] = cache
        while len(self._parked) > self._max_parked:
            self._parked.popitem(last=False)

    def unpark(self, request_id: str) -> list[Any] | None:
        return self._parked.pop(request_id, None)

    def apply(
        self, message: PrefixCached, active_cache: list[Any] | None, address: str
    ) -> PrefixCached | PrefixCacheConfirmed | None:
        """A later stage: drop what the first stage evicted, keep the entry if this stage can, and
        return what goes on (to the next stage, or the confirmation to the first)."""
        self.snapshots.drop(message.evicted)
        cache = self.unpark(message.request_id) or active_cache
        saved = (
            bool(message.tokens)
            and cache is not None
            and self.snapshots.save(message.request_id, cache, message.tokens)
        )
        if message.stage_index == len(message.route) - 1:
            return (
                PrefixCacheConfirmed(request_id=message.request_id, stage_address=address) if saved else None
            )
        # A stage that could not keep it tells the rest to keep nothing: it is never confirmed.
        return msgspec.structs.replace(
            message, stage_index=message.stage_index + 1, tokens=message.tokens if saved else 0
        )
