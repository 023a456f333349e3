"""What one durable write costs on this disk, alone: the floor under the quorum path's latency.

Raft acknowledges an event only once it is fsynced on a majority (the master's and a follower's
fsyncs run in parallel, docs/architecture.md), so the event's p99 cannot beat the disk's own
p99 for one durable write. Two loops at a steady rate, each write timed from its start to its
durable return, in a temporary folder on the disk the bench's nodes use (`--dir`, default the
system's temporary folder):

- raw: append `--size` bytes to a file, then `os.fdatasync` (what a plain log file would do);
- sqlite: one `BEGIN IMMEDIATE; INSERT; COMMIT` of a row of `--size` bytes in WAL mode with
  `synchronous=FULL` through exo's own log writer settings (what the event log does per group).

`--writers 3` runs that many loops at once on separate files (the three nodes of the bench share
one disk). Usage: `python -m bench.fsync_bench --rate 1000 --seconds 10 --size 200 --writers 3`.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from exo.store.sqlite_writer import apply_log_pragmas


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _paced(write: Callable[[int], None], rate: float, seconds: float) -> list[float]:
    """Call `write` `rate` times a second for `seconds`; each call's latency in ms. A call that
    starts late (the previous one overran its slot) is timed from its own start, not the slot's."""
    latencies: list[float] = []
    interval = 1.0 / rate
    start = time.monotonic()
    count = int(rate * seconds)
    for number in range(count):
        slot = start + number * interval
        delay = slot - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        began = time.monotonic()
        write(number)
        latencies.append((time.monotonic() - began) * 1000.0)
    return latencies


def raw_loop(folder: Path, size: int, rate: float, seconds: float) -> list[float]:
    payload = os.urandom(size)
    descriptor = os.open(folder / "raw.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:

        def write(_number: int) -> None:
            os.write(descriptor, payload)
            os.fdatasync(descriptor)

        return _paced(write, rate, seconds)
    finally:
        os.close(descriptor)


def sqlite_loop(folder: Path, size: int, rate: float, seconds: float) -> list[float]:
    payload = os.urandom(size)
    connection = sqlite3.connect(folder / "log.sqlite", isolation_level=None)
    try:
        apply_log_pragmas(connection, "full", 5000)
        connection.execute("CREATE TABLE events (event_index INTEGER PRIMARY KEY, payload BLOB)")

        def write(number: int) -> None:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO events VALUES (?, ?)", (number, payload))
            connection.execute("COMMIT")

        return _paced(write, rate, seconds)
    finally:
        connection.close()


def run(kind: str, folder: Path, *, writers: int, size: int, rate: float, seconds: float) -> list[float]:
    loop = raw_loop if kind == "raw" else sqlite_loop
    results: list[list[float]] = [[] for _ in range(writers)]

    def one(number: int) -> None:
        own = folder / f"{kind}-{number}"
        own.mkdir()
        results[number] = loop(own, size, rate, seconds)

    threads = [threading.Thread(target=one, args=(number,)) for number in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [latency for result in results for latency in result]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="writes a second per writer")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=200, help="bytes per write (an event row)")
    parser.add_argument("--writers", type=int, default=1, help="loops at once, one file each")
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (the disk to test)")
    arguments = parser.parse_args()
    if arguments.rate <= 0 or arguments.seconds <= 0 or arguments.size <= 0 or arguments.writers <= 0:
        parser.error("--rate, --seconds, --size and --writers must be positive")
    load = " ".join(f"{figure:.2f}" for figure in os.getloadavg())
    print(f"load average {load}, {arguments.writers} writer(s) x {arguments.rate:g}/s, {arguments.size} B")
    with tempfile.TemporaryDirectory(prefix="exo-fsync-bench-", dir=arguments.dir) as directory:
        for kind in ("raw", "sqlite"):
            latencies = run(
                kind,
                Path(directory),
                writers=arguments.writers,
                size=arguments.size,
                rate=arguments.rate,
                seconds=arguments.seconds,
            )
            print(
                f"{kind:6} n={len(latencies)} p50 {statistics.median(latencies):.2f} ms"
                f"  p90 {_percentile(latencies, 0.90):.2f}  p99 {_percentile(latencies, 0.99):.2f}"
                f"  p99.9 {_percentile(latencies, 0.999):.2f}  max {max(latencies):.2f} ms"
            )


if __name__ == "__main__":
    main()
