"""Replay and append speed of the SQLite event store.

    .venv/bin/python bench/replay_bench.py [--events 1000000] [--dir DIR]

Writes a realistic log (mostly NodeMemoryMeasured / NodeLabelled / RunnerStatusUpdated, some
NodeJoined / MasterElected / NodeTimedOut / instance churn), then times:
- the baseline: reading the log back and msgspec-decoding every event, without applying it;
- exo-replay's rebuild (`exo.replay.rebuild`: the same read + decode + exo.core.state.apply);
- the whole `exo-replay --json` command (process start, file checks, rebuild, output);
- append throughput at 1, 64 and 1024 events per commit, synchronous=FULL and NORMAL.
Read timings are best of --repeat, in wall-clock and in CPU seconds (on a shared machine the CPU
figure is what an idle core does). Prints markdown tables with the machine, load and date.
Never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from exo.core.events import (
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    MasterElected,
    ModelDownloadFailed,
    ModelDownloadFinished,
    ModelDownloadRequested,
    ModelDownloadStarted,
    ModelRemovalRequested,
    ModelRemoved,
    NodeJoined,
    NodeLabelled,
    NodeMemoryMeasured,
    NodeRemoved,
    NodeTimedOut,
    RunnerStatusUpdated,
    ShardAssignment,
    indexed_event_decoder,
)
from exo.replay import rebuild
from exo.store.location import Synchronous
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
        if index % 997 == 0:
            return _download_event(index, nodes[index % NODE_COUNT])
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
        if roll < 0.9945:
            return NodeTimedOut(node_id)
        if roll < 0.995:
            return NodeRemoved(node_id)  # an operator's `exo cluster remove`; it may join again
        if roll < 0.9995:
            return NodeJoined(node_id, "10.0.0.9:52414", 64 * GIB, 40 * GIB, node_id)
        term += 1
        return MasterElected(term=term, node_id=node_id)

    for index in range(1, count + 1):
        event = next_event(index)
        yield IndexedEvent(index, term, nodes[index % NODE_COUNT], index, event)


def _download_event(index: int, node_id: str) -> Event:
    """Model downloads are rare: one of their six events every 997th, in a fixed cycle."""
    model_id = f"org/model-{index % 3}"
    match (index // 997) % 6:
        case 0:
            return ModelDownloadRequested(node_id, model_id)
        case 1:
            return ModelDownloadStarted(node_id, model_id, 4 * GIB)
        case 2:
            return ModelDownloadFinished(node_id, model_id, 4 * GIB)
        case 3:
            return ModelDownloadFailed(node_id, model_id, "the Hub refused: 403")
        case 4:
            return ModelRemovalRequested(node_id, model_id, f"r{index}")
        case _:
            return ModelRemoved(node_id, model_id, request_id=f"r{index}")


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


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds and CPU seconds: on a shared machine the CPU figure is what an idle core
    would take (the process is not charged for time other work held the core)."""

    wall: float
    cpu: float


def timed(function: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def best(timings: list[Timing]) -> Timing:
    return Timing(min(timing.wall for timing in timings), min(timing.cpu for timing in timings))


def read_and_decode(reader: LogReader) -> None:
    """The baseline: the same reader and decoder as the replay, without apply."""
    decode = indexed_event_decoder.decode
    for batch in reader.rows():
        for _index, payload, _checksum in batch:
            decode(payload)


def replay_command(path: Path) -> Timing:
    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    wall, cpu = time.perf_counter(), children_cpu()
    subprocess.run(
        [sys.executable, "-m", "exo.replay", str(path), "--json"], check=True, stdout=subprocess.DEVNULL
    )
    return Timing(time.perf_counter() - wall, children_cpu() - cpu)


async def append_rate(path: Path, batch_size: int, total: int, synchronous: Synchronous) -> float:
    store = SqliteEventStore(str(path), synchronous=synchronous)
    await store.open()
    events = list(realistic_events(total))
    batches = [events[start : start + batch_size] for start in range(0, total, batch_size)]
    started = time.perf_counter()
    for batch in batches:
        await store.append(batch)
    elapsed = time.perf_counter() - started
    await store.close()
    return total / elapsed


def append_rates(directory: Path, repeat: int) -> dict[tuple[Synchronous, int], float]:
    """Best of `repeat` for each setting, FULL and NORMAL interleaved so both see the same disk weather."""
    rates: dict[tuple[Synchronous, int], float] = {}
    for batch_size, total in ((1, 1_000), (64, 64 * 100), (1024, 1024 * 40)):
        for _ in range(repeat):
            for synchronous in get_args(Synchronous):
                path = directory / "append.db"
                path.unlink(missing_ok=True)
                rate = asyncio.run(append_rate(path, batch_size, total, synchronous))
                rates[synchronous, batch_size] = max(rates.get((synchronous, batch_size), 0.0), rate)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description="Replay and append speed of the SQLite event store.")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the logs (default: a temp dir)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="best of N for every timing")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=arguments.dir) as temporary:
        directory = Path(temporary)
        log = directory / "events.db"
        write_rate = asyncio.run(write_log(log, arguments.events))
        size_mb = log.stat().st_size / 1e6
        with LogReader.open(str(log)) as reader:
            assert rebuild(reader).last_event_index == arguments.events
            baseline = best([timed(lambda: read_and_decode(reader)) for _ in range(arguments.repeat)])
            replay = best([timed(lambda: rebuild(reader)) for _ in range(arguments.repeat)])
        command = best([replay_command(log) for _ in range(2)])
        appends = append_rates(directory, arguments.repeat)
    print(
        report(
            count=arguments.events,
            size_mb=size_mb,
            write_rate=write_rate,
            baseline=baseline,
            replay=replay,
            command=command,
            appends=appends,
        )
    )


def report(
    *,
    count: int,
    size_mb: float,
    write_rate: float,
    baseline: Timing,
    replay: Timing,
    command: Timing,
    appends: dict[tuple[Synchronous, int], float],
) -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [
        f"## Event store: {datetime.date.today()}, {platform.node()} ({platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load}), Python {platform.python_version()}",
        "",
        f"Log: {count:,} events, {size_mb:.0f} MB on disk, written at {write_rate:,.0f} events/s "
        f"({WRITE_BATCH} per commit, synchronous=NORMAL).",
        "",
        "| measurement | events/s (wall) | events per CPU second | ratio to baseline (CPU) |",
        "|---|---:|---:|---:|",
        _rate_row("baseline: read + msgspec decode, no apply", count, baseline, baseline),
        _rate_row(
            "replay: read + decode + `exo.core.state.apply` (`exo.replay.rebuild`)", count, replay, baseline
        ),
        _rate_row(
            f"`exo-replay --json` command, whole process ({command.wall:.1f} s)", count, command, baseline
        ),
        "",
        "| events per commit | synchronous=FULL events/s | synchronous=NORMAL events/s | FULL / NORMAL |",
        "|---:|---:|---:|---:|",
    ]
    for batch_size in (1, 64, 1024):
        full, normal = appends["full", batch_size], appends["normal", batch_size]
        lines.append(f"| {batch_size} | {full:,.0f} | {normal:,.0f} | {full / normal:.2f} |")
    return "\n".join(lines)


def _rate_row(name: str, count: int, timing: Timing, baseline: Timing) -> str:
    ratio = baseline.cpu / timing.cpu
    return f"| {name} | {count / timing.wall:,.0f} | {count / timing.cpu:,.0f} | {ratio:.2f} |"


if __name__ == "__main__":
    main()
