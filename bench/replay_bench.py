"""Replay and append speed of the SQLite event store.

    .venv/bin/python bench/replay_bench.py [--events 1000000] [--dir DIR]

Writes a realistic log (mostly NodeMemoryMeasured / NodeLabelled / RunnerStatusUpdated, some
NodeJoined / MasterElected / NodeTimedOut / instance churn), then times:
- the baseline: reading the log back and msgspec-decoding every event, without applying it;
- exo-replay's rebuild (`exo.replay.rebuild`: the same read + decode + exo.state.apply);
- the whole `exo-replay --json` command (process start, file checks, rebuild, output);
- append throughput at 1, 64 and 1024 events per commit, synchronous=FULL and NORMAL.
Prints a markdown table with the machine and date. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from exo.events import (
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    MasterElected,
    NodeJoined,
    NodeLabelled,
    NodeMemoryMeasured,
    NodeTimedOut,
    RunnerStatusUpdated,
    ShardAssignment,
    indexed_event_decoder,
)
from exo.replay import rebuild
from exo.store.reader import LogReader
from exo.store.sqlite import SqliteEventStore

NODE_COUNT = 8
WRITE_BATCH = 8192
GIB = 1 << 30


def realistic_events(count: int, seed: int = 7) -> Iterator[IndexedEvent]:
    """A cluster's life: a master, nodes joining, instances placed, then mostly measurements,
    labels and runner reports, with the occasional node timing out and rejoining."""
    rng = random.Random(seed)
    nodes = [f"node{number}" for number in range(NODE_COUNT)]
    term = 1
    created = 0
    live: list[str] = []

    def next_event(index: int) -> Event:
        nonlocal term, created
        if index == 1:
            return MasterElected(term=term, node_id=nodes[0])
        if index <= 1 + NODE_COUNT:
            node_id = nodes[index - 2]
            return NodeJoined(node_id, f"10.0.0.{index}:52414", 64 * GIB, 48 * GIB, node_id)
        node_id = rng.choice(nodes)
        roll = rng.random()
        if roll < 0.40:
            return NodeMemoryMeasured(node_id, 64 * GIB, rng.randrange(8 * GIB, 60 * GIB))
        if roll < 0.65:
            return NodeLabelled(node_id, f"label{rng.randrange(16)}", str(rng.randrange(1000)))
        if roll < 0.98 and live:
            return RunnerStatusUpdated(rng.choice(live), node_id, rng.choice(("loading", "ready", "ready")))
        if roll < 0.99:
            # Instance churn: a handful live at a time, as on a real cluster.
            if len(live) >= 4:
                return InstanceDeleted(live.pop(0))
            created += 1
            live.append(f"i-{created}")
            stages = rng.sample(nodes, 2)
            assignments = {
                stage: ShardAssignment(position * 16, position * 16 + 16, 32)
                for position, stage in enumerate(stages)
            }
            return InstanceCreated(live[-1], "llama-3-8b", "Pipeline", assignments)
        if roll < 0.995:
            return NodeTimedOut(node_id)
        if roll < 0.9995:
            return NodeJoined(node_id, "10.0.0.9:52414", 64 * GIB, 40 * GIB, node_id)
        term += 1
        return MasterElected(term=term, node_id=node_id)

    for index in range(1, count + 1):
        event = next_event(index)
        yield IndexedEvent(index, term, nodes[index % NODE_COUNT], index, event)


async def write_log(path: Path, count: int) -> float:
    store = SqliteEventStore(str(path), synchronous="normal")
    await store.open()
    started = time.perf_counter()
    batch: list[IndexedEvent] = []
    for indexed in realistic_events(count):
        batch.append(indexed)
        if len(batch) == WRITE_BATCH:
            await store.append(batch)
            batch = []
    await store.append(batch)
    elapsed = time.perf_counter() - started
    await store.close()
    return count / elapsed


def read_and_decode(path: Path) -> tuple[int, float]:
    """The baseline: the same reader and decoder as the replay, without apply."""
    decode = indexed_event_decoder.decode
    with LogReader.open(str(path)) as reader:
        started = time.perf_counter()
        count = 0
        for batch in reader.rows():
            for _index, payload in batch:
                decode(payload)
            count += len(batch)
        return count, time.perf_counter() - started


def replay(path: Path) -> tuple[int, float]:
    with LogReader.open(str(path)) as reader:
        started = time.perf_counter()
        state = rebuild(reader)
        return state.last_event_index, time.perf_counter() - started


def replay_command(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "exo.replay", str(path), "--json"], check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - started


async def append_rate(directory: Path, batch_size: int, total: int, synchronous: str) -> float:
    path = directory / f"append-{synchronous}-{batch_size}.db"
    store = SqliteEventStore(str(path), synchronous="full" if synchronous == "full" else "normal")
    await store.open()
    events = list(realistic_events(total))
    batches = [events[start : start + batch_size] for start in range(0, total, batch_size)]
    started = time.perf_counter()
    for batch in batches:
        await store.append(batch)
    elapsed = time.perf_counter() - started
    await store.close()
    return total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description="Replay and append speed of the SQLite event store.")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the logs (default: a temp dir)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="best of N for the read timings")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=arguments.dir) as temporary:
        directory = Path(temporary)
        log = directory / "events.db"
        write_rate = asyncio.run(write_log(log, arguments.events))
        size_mb = log.stat().st_size / 1e6
        baseline = min(read_and_decode(log)[1] for _ in range(arguments.repeat))
        replay_runs = [replay(log) for _ in range(arguments.repeat)]
        replayed, replay_seconds = replay_runs[0][0], min(seconds for _, seconds in replay_runs)
        assert replayed == arguments.events, replayed
        command_seconds = min(replay_command(log) for _ in range(2))
        appends = {
            (synchronous, batch_size): asyncio.run(append_rate(directory, batch_size, total, synchronous))
            for synchronous in ("full", "normal")
            for batch_size, total in ((1, 2_000), (64, 64 * 200), (1024, 1024 * 60))
        }
    print(
        report(
            count=arguments.events,
            size_mb=size_mb,
            write_rate=write_rate,
            baseline=baseline,
            replay_seconds=replay_seconds,
            command_seconds=command_seconds,
            appends=appends,
        )
    )


def report(
    *,
    count: int,
    size_mb: float,
    write_rate: float,
    baseline: float,
    replay_seconds: float,
    command_seconds: float,
    appends: dict[tuple[str, int], float],
) -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [
        f"## Event store: {datetime.date.today()}, {platform.node()} ({platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load}), Python {platform.python_version()}",
        "",
        f"Log: {count:,} events, {size_mb:.0f} MB on disk, written at {write_rate:,.0f} events/s "
        f"({WRITE_BATCH} per commit, synchronous=NORMAL).",
        "",
        "| measurement | events/s | ratio to baseline |",
        "|---|---:|---:|",
        f"| baseline: read + msgspec decode, no apply | {count / baseline:,.0f} | 1.00 |",
        f"| replay: read + decode + apply (`exo.replay.rebuild`) | {count / replay_seconds:,.0f} "
        f"| {baseline / replay_seconds:.2f} |",
        f"| `exo-replay --json` command, wall clock ({command_seconds:.2f} s) "
        f"| {count / command_seconds:,.0f} | {baseline / command_seconds:.2f} |",
        "",
        "| events per commit | synchronous=FULL events/s | synchronous=NORMAL events/s | FULL / NORMAL |",
        "|---:|---:|---:|---:|",
    ]
    for batch_size in (1, 64, 1024):
        full, normal = appends["full", batch_size], appends["normal", batch_size]
        lines.append(f"| {batch_size} | {full:,.0f} | {normal:,.0f} | {full / normal:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
