"""exo-replay on generated logs: in-process through main() and as a real subprocess."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from exo.core.events import (
    Event,
    IndexedEvent,
    InstanceCreated,
    MasterElected,
    NodeJoined,
    NodeLabelled,
    NodeMemoryMeasured,
    NodeTimedOut,
    RunnerStatusUpdated,
    ShardAssignment,
)
from exo.core.fold import LogGapError, fold_events
from exo.core.state import State, apply, state_document
from exo.node.replica import restore
from exo.replay import main
from exo.store import InMemoryEventStore, Snapshot, SqliteEventStore
from exo.store.restore import restore_state

REPO_ROOT = Path(__file__).resolve().parent.parent
EVENT_COUNT = 300


def scenario(count: int = EVENT_COUNT) -> list[IndexedEvent]:
    """A small cluster's life: a master, three nodes, an instance that gets ready and then fails
    when a node times out, and a stream of measurements and labels."""
    opening: list[Event] = [
        MasterElected(term=1, node_id="node0"),
        NodeJoined("node0", "10.0.0.1:52414", 100, 90),
        NodeJoined("node1", "10.0.0.2:52414", 200, 150),
        NodeJoined("node2", "10.0.0.3:52414", 300, 250),
        InstanceCreated(
            "i-1", "tiny", "Pipeline", {"node0": ShardAssignment(0, 4, 8), "node1": ShardAssignment(4, 8, 8)}
        ),
        RunnerStatusUpdated("i-1", "node0", "ready"),
        RunnerStatusUpdated("i-1", "node1", "ready"),
        InstanceCreated("i-2", "tiny", "Pipeline", {"node2": ShardAssignment(0, 8, 8)}),
        RunnerStatusUpdated("i-2", "node2", "loading"),
    ]
    middle: list[Event] = [
        NodeMemoryMeasured(f"node{index % 3}", 100, index)
        if index % 2
        else NodeLabelled("node2", "n", str(index))
        for index in range(count - len(opening) - 2)
    ]
    closing: list[Event] = [MasterElected(term=2, node_id="node1"), NodeTimedOut("node0")]
    return [
        IndexedEvent(index, 1 if index < count - 1 else 2, "node0", index, event)
        for index, event in enumerate([*opening, *middle, *closing], start=1)
    ]


def fold(events: list[IndexedEvent]) -> State:
    state = State()
    for indexed in events:
        state = apply(state, indexed)
    return state


def write_log(path: Path, events: list[IndexedEvent], snapshot_at: int | None = None) -> None:
    async def write() -> None:
        store = SqliteEventStore(str(path))
        await store.open()
        await store.append(events)
        if snapshot_at is not None:
            await store.save_snapshot(Snapshot(snapshot_at, fold(events[:snapshot_at])))
        await store.close()

    asyncio.run(write())


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "events.db"
    write_log(path, scenario())
    return path


def run_main(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, str, str]:
    code = main(list(arguments))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_summary_names_the_figures(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, str(log))
    assert (code, err) == (0, "")
    assert f"{EVENT_COUNT} events stored (indices 1..{EVENT_COUNT})" in out
    assert f"last index: {EVENT_COUNT}   term: 2   master: node1" in out
    assert "nodes: 3 (alive 2, gone 1)" in out
    assert "instances: 2 (failed 1, loading 1)" in out
    assert "MasterElected" in out and "NodeTimedOut" in out


def test_json_is_the_state_document_of_the_folded_log(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, str(log), "--json")
    assert code == 0
    assert out.encode() == state_document(fold(scenario()))
    document = json.loads(out)
    assert document["last_event_index"] == EVENT_COUNT
    assert document["instances"]["i-1"]["status"] == "failed"


@pytest.mark.parametrize("until", [0, 1, 7, 150, EVENT_COUNT, EVENT_COUNT + 50])
def test_until_stops_after_that_index(log: Path, capsys: pytest.CaptureFixture[str], until: int) -> None:
    code, out, _ = run_main(capsys, f"sqlite+aiosqlite:///{log}", "--json", "--until", str(until))
    assert code == 0
    assert out.encode() == state_document(fold(scenario()[:until]))


def test_until_starts_from_the_newest_snapshot_at_or_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = scenario()
    path = tmp_path / "events.db"
    write_log(path, events, snapshot_at=100)
    # Drop the events the snapshot covers: the rebuild can only have come from the snapshot.
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM events WHERE event_index <= 100")
    connection.close()
    for until in (100, 180):
        code, out, _ = run_main(capsys, str(path), "--json", "--until", str(until))
        assert code == 0
        assert out.encode() == state_document(fold(events[:until]))
    code, _, err = run_main(capsys, str(path), "--until", "50")
    assert code == 1
    assert err == "exo-replay: bad index 1: missing (the log continues at 101)\n"
    code, out, _ = run_main(capsys, str(path), "--verify")
    assert (code, out) == (0, f"ok: {EVENT_COUNT - 100} events\n")


def test_list_prints_one_event_per_line(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, str(log), "--list", "--until", "20")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 20
    index, term, event_type, payload = lines[4].split(None, 3)
    assert (index, term, event_type) == ("5", "1", "InstanceCreated")
    assert payload.startswith('{"instance_id":"i-1"')
    assert len(payload) <= 100


def test_verify_a_good_log(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, str(log), "--verify") == (0, f"ok: {EVENT_COUNT} events\n", "")


def test_verify_names_the_first_missing_index(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with sqlite3.connect(log) as connection:
        connection.execute("DELETE FROM events WHERE event_index IN (120, 121, 200)")
    connection.close()
    code, out, err = run_main(capsys, str(log), "--verify")
    assert (code, out) == (1, "")
    assert err == "exo-replay: bad index 120: missing (the log continues at 122)\n"
    assert run_main(capsys, str(log), "--json")[0] == 1


def test_verify_names_an_undecodable_event(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with sqlite3.connect(log) as connection:
        connection.execute("UPDATE events SET payload = x'93c1ffee' WHERE event_index = 77")
    connection.close()
    code, _, err = run_main(capsys, str(log), "--verify")
    assert code == 1
    assert err.startswith("exo-replay: bad index 77: does not decode (")
    code, _, err = run_main(capsys, str(log))
    assert (code, err.count("\n")) == (1, 1)
    assert "bad index 77" in err
    code, out, err = run_main(capsys, str(log), "--list")
    assert (code, len(out.splitlines())) == (1, 76)
    assert err.startswith("exo-replay: bad index 77: does not decode (")


def test_a_log_that_starts_late_without_a_snapshot_fails_verify(
    log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(log) as connection:
        connection.execute("DELETE FROM events WHERE event_index <= 10")
    connection.close()
    code, _, err = run_main(capsys, str(log), "--verify")
    assert code == 1
    assert err == "exo-replay: bad index 1: missing (the log starts at 11 and has no snapshot at 10)\n"


def test_an_empty_store_replays_to_the_empty_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "events.db"
    write_log(path, [])
    assert run_main(capsys, str(path), "--json") == (0, state_document(State()).decode(), "")
    assert run_main(capsys, str(path), "--verify")[:2] == (0, "ok: 0 events\n")


def test_replay_never_writes_the_log(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sha(log)
    for arguments in ([], ["--json"], ["--list"], ["--verify"], ["--until", "3"]):
        assert run_main(capsys, str(log), *arguments)[0] == 0
    assert sha(log) == before


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    connection.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_foreign, "is not an exo event store"),
        (lambda path: path.write_bytes(os.urandom(4096)), "is not an SQLite database"),
        (lambda path: sqlite3.connect(path).close(), "is not an exo event store"),
        (lambda path: path.write_bytes(b"SQLite format 3\x00" + bytes(40)), "corrupt"),
    ],
    ids=["foreign", "random-bytes", "empty-database", "truncated"],
)
def test_files_that_are_not_exo_logs_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object, message: str
) -> None:
    path = tmp_path / "events.db"
    assert callable(make)
    make(path)
    before = sha(path)
    code, out, err = run_main(capsys, str(path))
    assert (code, out) == (2, "")
    assert err.startswith("exo-replay: ") and message in err and err.count("\n") == 1
    assert sha(path) == before


def test_a_missing_file_is_a_one_line_error_and_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(capsys, str(tmp_path / "nothing.db"))
    assert code == 2
    assert err == f"exo-replay: {tmp_path / 'nothing.db'}: no such file\n"
    assert list(tmp_path.iterdir()) == []


def test_a_newer_schema_is_refused(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with sqlite3.connect(log) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'exo_9999'")
    connection.close()
    code, _, err = run_main(capsys, str(log))
    assert code == 2 and "newer than this exo knows" in err


def test_memory_url_and_bad_until_are_usage_errors(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "memory://")[0] == 2
    with pytest.raises(SystemExit) as exit_info:
        main([str(log), "--until", "-3"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main([str(log), "--json", "--list"])


def _command(*arguments: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "exo.replay", *arguments],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_the_command_prints_json_and_errors_without_tracebacks(log: Path, tmp_path: Path) -> None:
    result = _command(str(log), "--json", "--until", "150")
    assert result.returncode == 0, result.stderr
    assert result.stdout.encode() == state_document(fold(scenario()[:150]))
    missing = _command(str(tmp_path / "missing.db"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("exo-replay: ") and "Traceback" not in missing.stderr


def test_the_fold_refuses_a_hole() -> None:
    events = scenario(20)
    with pytest.raises(LogGapError) as gap:
        fold_events([*events[:5], *events[6:]])
    assert (gap.value.expected, gap.value.found) == (6, 7)
    with pytest.raises(LogGapError):
        fold_events(events[1:])
    assert fold_events(events[10:], fold(events[:10])) == fold(events)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_restore_state_from_a_store_equals_the_fold(tmp_path: Path, kind: str) -> None:
    events = scenario()
    store = InMemoryEventStore() if kind == "memory" else SqliteEventStore(str(tmp_path / "events.db"))
    await store.open()
    await store.append(events)
    await store.save_snapshot(Snapshot(120, fold(events[:120])))
    assert await restore_state(store) == fold(events)
    assert await restore_state(store, until=200) == fold(events[:200])
    assert await restore_state(store, until=50) == fold(events[:50])
    await store.close()


def test_node_start_up_refuses_a_log_with_a_hole_as_exo_replay_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Start-up, truncation and exo-replay fold through one fold: a hole is an error in all of them,
    never a state that silently skipped events."""
    events = scenario(40)
    path = tmp_path / "events.db"
    write_log(path, events)
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM events WHERE event_index = 17")
    connection.close()

    async def check() -> None:
        store = SqliteEventStore(str(path))
        await store.open()
        try:
            with pytest.raises(LogGapError) as gap:
                await restore(store)
            assert (gap.value.expected, gap.value.found) == (17, 18)
            assert await restore_state(store, until=16) == fold(events[:16])
            with pytest.raises(LogGapError):
                await restore_state(store, until=30)
        finally:
            await store.close()

    asyncio.run(check())
    code, _, err = run_main(capsys, str(path), "--json")
    assert (code, err) == (1, "exo-replay: bad index 17: missing (the log continues at 18)\n")


def test_a_store_whose_events_stop_short_is_refused_before_its_snapshot(tmp_path: Path) -> None:
    events = scenario(40)
    path = tmp_path / "events.db"
    write_log(path, events, snapshot_at=40)
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM events")
    connection.close()

    async def check() -> None:
        store = SqliteEventStore(str(path))
        await store.open()
        try:
            assert await restore_state(store) == fold(events)  # the snapshot covers the whole log
            with pytest.raises(LogGapError) as gap:
                await restore_state(store, until=10)
            assert (gap.value.expected, gap.value.found) == (1, None)
        finally:
            await store.close()

    asyncio.run(check())
