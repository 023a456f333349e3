"""Events through the whole path: a node's local event -> master -> SQLite -> applied on 3 nodes.

Three nodes on loopback: the master (`--force-master`) and a follower run as subprocesses; the
origin node runs in this process so it can submit events directly and timestamp each one when it
comes back applied.

What "applied back at the origin" proves depends on the commit rule of the tree measured: with
quorum commits (Raft, issue 18) a node applies only committed events, so every timestamp is taken
after the event was durable on a majority (2 of 3: the master and at least one follower); with the
bully election a follower applies what the master alone made durable. `bench/quorum_compare.py`
runs this bench on two trees, rounds interleaved, to compare them.

    python -m bench.events_bench [--events 100000] [--rate 1000] [--seconds 5]

Prints a markdown table; figures go into docs/benchmarks.md by hand or via `python -m bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from exo.core.events import IndexedEvent, NodeLabelled
from exo.node.cluster import ClusterMember
from exo.node.main import NodeConfig, run_node
from exo.roles.outbox import RESEND_AFTER_SECONDS
from tests.harness.cluster_harness import NodeProcess, free_port, wait_until

SUBMIT_CHUNK = 1000
TARGET_EVENTS_PER_SECOND = 20_000
# Submitted but not yet applied back at the origin: half of what the target rate applies within the
# outbox's resend timeout. A deeper window (it was 50,000) keeps events queued past that timeout,
# the origin resends them (226,000 resends for 100,000 events), and the bench measures the storm.
MAX_IN_FLIGHT = int(TARGET_EVENTS_PER_SECOND * RESEND_AFTER_SECONDS / 2)
# The latency target is for a steady rate: the first second at that rate is not counted. Right
# after the throughput run every node is still writing and checkpointing its 100,000 events, and
# the first 0.2-0.5 s saw 15-20 ms stalls in most runs (a queue draining, not the steady path).
WARMUP_SECONDS = 1.0


@dataclass(frozen=True)
class EventsResult:
    all_rate: float
    origin_rate: float
    p50_ms: float
    p99_ms: float
    latency_samples: int


def node_config(  # noqa: PLR0917 - a plain record of a bench node's settings
    root: Path,
    name: str,
    bus_port: int,
    peers: list[str],
    synchronous: str,
    cluster_secret: str | None = None,
) -> NodeConfig:
    return NodeConfig(
        node_id=name,
        data_dir=root / name,
        models_dir=root / name / "models",
        api_port=0,
        api_host="127.0.0.1",
        api=False,
        bus_port=bus_port,
        peers=tuple(peers),
        discovery=False,
        force_master=False,
        event_store=f"sqlite+aiosqlite:///{root / name / 'events.db'}?synchronous={synchronous}",
        cluster_secret=cluster_secret,
        api_key=None,
        verbosity=0,
    )


class AppliedClock:
    """Records when each of the origin's own events is applied at the origin."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.applied_at: dict[int, float] = {}

    def __call__(self, events: Sequence[IndexedEvent]) -> None:
        now = time.perf_counter()
        for event in events:
            if event.origin_node_id == self.origin:
                self.applied_at[event.origin_sequence] = now


async def wait_index(member: ClusterMember, index: int, timeout: float) -> None:
    if not await member.replica.wait_for(lambda state: state.last_event_index >= index, timeout):
        raise RuntimeError(f"index {index} not applied within {timeout}s")


def remote_index(node: NodeProcess) -> int:
    return int(httpx.get(node.url + "/state", timeout=5).json()["last_event_index"])


async def throughput(member: ClusterMember, others: list[NodeProcess], count: int) -> tuple[float, float]:
    start_index = member.replica.last_index
    target = start_index + count
    started = time.perf_counter()
    submitted = 0
    while submitted < count:
        in_flight = submitted - (member.replica.last_index - start_index)
        if in_flight > MAX_IN_FLIGHT:
            # Wait for progress: a predicate that already holds would return without yielding, and
            # this loop would then spin forever with the event loop starved.
            applied = member.replica.last_index
            await member.replica.wait_for(lambda state, last=applied: state.last_event_index > last, 1.0)
            continue
        chunk = min(SUBMIT_CHUNK, count - submitted)
        member.submit([NodeLabelled(member.node_id, "bench", str(submitted + i)) for i in range(chunk)])
        submitted += chunk
        await asyncio.sleep(0)
    await wait_index(member, target, 120)
    origin_done = time.perf_counter() - started
    for node in others:
        await asyncio.to_thread(wait_until, lambda node=node: remote_index(node) >= target, 120, node.name)
    all_done = time.perf_counter() - started
    return count / origin_done, count / all_done


async def latency(member: ClusterMember, clock: AppliedClock, rate: int, seconds: float) -> list[float]:
    """Latencies of the events submitted at `rate` during `seconds`, after WARMUP_SECONDS at the
    same rate that are not counted (see WARMUP_SECONDS)."""
    submitted_at: dict[int, float] = {}
    interval = 1.0 / rate
    started = time.perf_counter()
    n = 0
    while (now := time.perf_counter()) - started < WARMUP_SECONDS + seconds:
        due = int((now - started) / interval)
        while n < due:
            member.submit([NodeLabelled(member.node_id, "latency", str(n))])
            if n * interval >= WARMUP_SECONDS:
                submitted_at[member.outbox.last_sequence] = time.perf_counter()
            n += 1
        # Wake when the next event is due, not more often: the submitter shares the 2 cores with
        # the path it measures.
        await asyncio.sleep(max(0.0, started + (n + 1) * interval - time.perf_counter()))
    deadline = time.perf_counter() + 30
    while len([s for s in submitted_at if s in clock.applied_at]) < len(submitted_at):
        if time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.01)
    return sorted(
        (clock.applied_at[sequence] - sent) * 1000
        for sequence, sent in submitted_at.items()
        if sequence in clock.applied_at
    )


async def measure(
    events: int, rate: int, seconds: float, synchronous: str, cluster_secret: str | None = None
) -> EventsResult:
    """One run: throughput of `events` events, then latency at `rate`/s for `seconds`."""
    secret_args = ["--cluster-secret", cluster_secret] if cluster_secret else []
    with tempfile.TemporaryDirectory(prefix="exo-events-bench-") as directory:
        root = Path(directory)
        ports = [free_port() for _ in range(3)]
        peers = [f"127.0.0.1:{port}" for port in ports]

        def store(name: str) -> list[str]:
            return [
                "--event-store",
                f"sqlite+aiosqlite:///{root / name / 'events.db'}?synchronous={synchronous}",
                *secret_args,
            ]

        master = NodeProcess(
            "master", root / "master", ports[0], free_port(), peers, ["--force-master", *store("master")]
        )
        follower = NodeProcess("follower", root / "follower", ports[1], free_port(), peers, store("follower"))
        others = [master, follower]
        # The master leads before anyone else starts: the in-process origin starts faster than a
        # subprocess, would win the first election alone, and a forced master that finds a sitting
        # master follows it, so the path measured would never cross to another process.
        master.start()
        await asyncio.to_thread(
            wait_until, lambda: master.get("/state")["master_node_id"] == "master", 60, "master elected"
        )
        follower.start()
        stop = asyncio.Event()
        ready: asyncio.Future[ClusterMember] = asyncio.get_running_loop().create_future()
        node_task = asyncio.create_task(
            run_node(
                node_config(root, "origin", ports[2], peers, synchronous, cluster_secret),
                stop,
                on_ready=ready.set_result,
            )
        )
        try:
            member = await asyncio.wait_for(ready, 60)
            formed = await member.replica.wait_for(
                lambda s: (
                    s.master_node_id == "master" and sum(n.status == "alive" for n in s.nodes.values()) == 3
                ),
                60,
            )
            if not formed or member.is_master:
                raise RuntimeError(f"the cluster did not form around the master node: {member.state}")
            clock = AppliedClock(member.node_id)
            member.replica.applied_listeners.append(clock)
            origin_rate, all_rate = await throughput(member, others, events)
            latencies = await latency(member, clock, rate, seconds)
        finally:
            stop.set()
            await node_task
            for node in others:
                node.stop()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    return EventsResult(all_rate, origin_rate, statistics.median(latencies), p99, len(latencies))


def load_after() -> str:
    return " ".join(f"{figure:.2f}" for figure in os.getloadavg())


async def main_async(events: int, rate: int, seconds: float, synchronous: str) -> None:
    load_before = load_after()
    result = await measure(events, rate, seconds, synchronous)
    print(
        f"# events bench, {platform.node()} ({platform.processor() or platform.machine()}), "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores, load average before {load_before}, after {load_after()}"
    )
    print()
    print("| measure | value | target | ratio to target |")
    print("|---|---|---|---|")
    print(
        f"| events/s, submitted -> applied on all 3 nodes ({events} events) | {result.all_rate:,.0f} "
        f"| {TARGET_EVENTS_PER_SECOND:,} "
        f"| {result.all_rate / TARGET_EVENTS_PER_SECOND:.2f}x |"
    )
    print(f"| events/s, submitted -> applied back at the origin | {result.origin_rate:,.0f} | | |")
    print(
        f"| latency p50 at {rate}/s for {seconds:g}s after {WARMUP_SECONDS:g}s "
        f"({result.latency_samples} events) "
        f"| {result.p50_ms:.2f} ms | | |"
    )
    print(
        f"| latency p99 at {rate}/s | {result.p99_ms:.2f} ms | 10 ms | {10 / result.p99_ms:.2f}x headroom |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--synchronous", choices=["full", "normal"], default="full")
    arguments = parser.parse_args()
    asyncio.run(main_async(arguments.events, arguments.rate, arguments.seconds, arguments.synchronous))


if __name__ == "__main__":
    main()
