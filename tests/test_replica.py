"""The replica over a store: restore folds only what Raft committed (the recorded commit index, or
the whole log when none was recorded), applies strictly in order, and serves only the committed log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exo.core.events import IndexedEvent, NodeJoined, NodeLabelled
from exo.core.fold import LogGapError
from exo.core.state import State
from exo.node.replica import Replica, restore
from exo.store.base import Snapshot
from exo.store.memory import InMemoryEventStore
from exo.store.restore import restore_state
from exo.store.sqlite import SqliteEventStore


def log(length: int, term: int = 1, origin: str = "m", start: int = 1) -> list[IndexedEvent]:
    events: list[IndexedEvent] = []
    for index in range(start, start + length):
        event = NodeJoined("n", "h:1") if index == 1 else NodeLabelled("n", "k", f"{origin}{index}")
        events.append(IndexedEvent(index, term, origin, index, event))
    return events


async def store_with(events: list[IndexedEvent], committed: int | None = None) -> InMemoryEventStore:
    store = InMemoryEventStore()
    await store.open()
    await store.append(events)
    if committed is not None:
        await store.save_commit_index(committed)
    return store


async def test_restore_of_a_log_without_a_commit_index_folds_all_of_it() -> None:
    """A log written before quorum commits: every stored event was committed under its rules."""
    store = await store_with(log(50))
    restored = await restore(store)
    assert restored.state == await restore_state(store)
    assert restored.last_index == 50
    assert [entry.index for entry in restored.log.entries] == list(range(1, 51))
    assert restored.high_water.is_new("m", 50) is False


async def test_restore_folds_only_up_to_the_recorded_commit_index() -> None:
    """The rest is Raft's uncommitted tail: handed to the core, neither applied nor served."""
    store = await store_with(log(10), committed=6)
    restored = await restore(store)
    assert restored.last_index == 6
    assert restored.state == await restore_state(store, 6)
    assert [entry.index for entry in restored.log.entries] == list(range(1, 11))
    assert restored.high_water.is_new("m", 7)  # not applied: its origin's resend is still new
    assert [entry.index for entry in await restored.read(1)] == list(range(1, 7))
    assert await restored.read(7) == []


async def test_restore_starts_the_raft_log_after_a_snapshot() -> None:
    store = InMemoryEventStore()
    await store.open()
    base = await restore_state(await store_with(log(20)))
    await store.save_snapshot(Snapshot(20, base))
    await store.append(log(5, term=2, start=21))
    restored = await restore(store)
    assert restored.last_index == 25
    assert restored.log.base_index == 20 and restored.log.base_voters == frozenset({"n"})
    assert [entry.index for entry in restored.log.entries] == list(range(21, 26))


async def test_restore_refuses_a_log_with_a_hole() -> None:
    store = await store_with(log(5))
    store._events.extend(log(2, start=8))  # pyright: ignore[reportPrivateUsage] - 6 and 7 are gone
    with pytest.raises(LogGapError):
        await restore(store)


async def test_apply_folds_in_order_and_skips_what_was_applied() -> None:
    replica = Replica(await store_with(log(10)), State())
    seen: list[int] = []
    replica.applied_listeners.append(lambda entries: seen.extend(entry.index for entry in entries))
    events = log(10)
    await replica.apply(events[:4])
    await replica.apply(events[2:7])
    assert replica.last_index == 7 and seen == list(range(1, 8))
    with pytest.raises(AssertionError, match="without a gap"):
        await replica.apply(events[8:])
    assert [entry.index for entry in await replica.read(1, limit=3)] == [1, 2, 3]
    assert await replica.read(8) == []


async def test_wait_for_wakes_when_an_apply_makes_it_true() -> None:
    replica = Replica(await store_with(log(3)), State())
    assert not await replica.wait_for(lambda state: state.last_event_index >= 3, 0.01)
    await replica.apply(log(3))
    assert await replica.wait_for(lambda state: state.last_event_index >= 3, 1)


def replay(path: Path, *arguments: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "exo.replay", str(path), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return completed.stdout


async def test_exo_replay_serves_only_committed_events_and_all_of_an_old_log(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SqliteEventStore(str(path))
    await store.open()
    await store.append(log(8))
    await store.close()
    assert len(replay(path, "--list").splitlines()) == 8  # no commit index: as before Raft
    await store.open()
    await store.save_commit_index(5)
    assert await store.load_commit_index() == 5
    await store.close()
    assert len(replay(path, "--list").splitlines()) == 5
    assert '"last_event_index":5' in replay(path, "--json").replace(" ", "")
    assert replay(path, "--verify").startswith("ok: 8 events")  # verify checks the whole stored log
