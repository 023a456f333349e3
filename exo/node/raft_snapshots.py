"""Compaction and snapshot install for the Raft shell (exo/node/raft_member.py).

Why: the core holds its log in memory; without compaction a long-running node grows without
bound, and a follower behind its master's base (a master restarted from a store snapshot, a wiped
node joining a long-running cluster) could never catch up.

- Every `compact_every` applied entries the node saves a store snapshot of its folded state at the
  applied index, then compacts the core up to the *previous* snapshot: the core keeps between one
  and two `compact_every` of entries (a tail for slow followers), and the store keeps a snapshot at
  the core's base, which is what a master offers. The store itself keeps every event (the durable
  full log `exo-replay` and `/events` read).
- A follower offered a snapshot asks the master for it by index over the bus's request path
  (`SnapshotRequested(index)`, authenticated like every bus frame); the answer is checked (it
  decodes, and its state is at the offered index) before anything on disk changes, so a corrupt or
  truncated payload is refused with a reason and the node keeps its state.
"""

from __future__ import annotations

import logging

from exo.core import messages as m
from exo.core.decoding import DECODE_ERRORS
from exo.core.state import State, decode_state, encode_state
from exo.node.env_settings import positive_setting
from exo.store.base import EventStore, Snapshot

logger = logging.getLogger(__name__)

COMPACT_EVERY_DEFAULT = 10_000
SNAPSHOT_FETCH_SECONDS = 10.0
# After a refused snapshot the next offer is taken this much later; the same index is warned about once.
SNAPSHOT_RETRY_SECONDS = 1.0


class SnapshotRejected(Exception):
    """A master's answer to `SnapshotRequested` that cannot be installed; the message says why."""


def compact_every_from_env() -> int:
    """EXO_RAFT_COMPACT_EVERY: applied entries between two snapshots (the core keeps one to two of these)."""
    return positive_setting("EXO_RAFT_COMPACT_EVERY", int, COMPACT_EVERY_DEFAULT, "a whole number of entries")


def state_from_answer(reply: m.Reply, index: int) -> State:
    """The state in a master's answer for the snapshot at `index`; SnapshotRejected otherwise."""
    match reply:
        case m.SnapshotAnswered(index=answered, state=data):
            pass
        case m.RequestFailed(reason=reason):
            raise SnapshotRejected(f"the master refused the snapshot at {index}: {reason}")
        case _:
            raise SnapshotRejected(f"the master answered {type(reply).__name__} for the snapshot at {index}")
    if answered != index:
        raise SnapshotRejected(f"the master sent the snapshot at {answered}, not the one at {index}")
    try:
        state = decode_state(data)
    except DECODE_ERRORS as error:
        size = len(data)
        raise SnapshotRejected(f"the snapshot at {index} ({size} bytes) does not decode: {error}") from None
    if state.last_event_index != index:
        raise SnapshotRejected(
            f"the snapshot at {index} holds the state after index {state.last_event_index}"
        )
    return state


async def answer_snapshot(store: EventStore, index: int) -> m.Reply:
    """A peer's request for the snapshot at `index`: this node's store snapshot at exactly that
    index (the one its core's base stands on), or a refusal naming what it has."""
    snapshot = await store.load_snapshot(index)
    if snapshot is None or snapshot.index != index:
        newest = await store.load_snapshot()
        have = f"newest at {newest.index}" if newest is not None else "none"
        return m.RequestFailed(f"no snapshot at {index} here ({have})")
    return m.SnapshotAnswered(index, encode_state(snapshot.state))


async def store_snapshot(store: EventStore, state: State, keep_log: bool, stored_index: int) -> None:
    """Make the snapshot durable before the core hears of it. With `keep_log` the stored entries
    (they match it) stay; otherwise those after it are dropped first (they conflict with the
    committed one at its index, so none is committed), then saving a snapshot past the stored
    events removes them all (exo/store/rules.py), so the store restarts from the snapshot."""
    index = state.last_event_index
    if not keep_log and stored_index >= index:
        await store.truncate_after(index - 1)
    await store.save_snapshot(Snapshot(index, state))
