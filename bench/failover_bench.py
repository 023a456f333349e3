"""Time from `kill -9` of the master to a new master serving writes, median of N runs.

Three nodes on loopback. "Serving writes" = the new master has sequenced its first event
(`MasterElected`) and a survivor has applied it: the moment GET /state on a survivor names the new
master. The killed node is restarted and rejoins before the next run.

    python -m bench.failover_bench [--runs 10]

Baseline for the ratio: upstream exo's published behaviour (a 3 s campaign plus 5 s timeouts,
then every model reloads), i.e. 8 s; target ≤ 2 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, wait_until

UPSTREAM_SECONDS = 8.0
TARGET_SECONDS = 2.0


def agreed_master(cluster: LoopbackCluster, nodes: list[NodeProcess]) -> str | None:
    state = cluster.converged(nodes)
    if state is None or sum(n["status"] == "alive" for n in state["nodes"].values()) != 3:
        return None
    return state["master_node_id"]


def one_failover(cluster: LoopbackCluster) -> float:
    master = wait_until(lambda: agreed_master(cluster, cluster.nodes), 60, "three nodes agree")
    victim = next(node for node in cluster.nodes if node.name == master)
    survivors = [node for node in cluster.nodes if node is not victim]
    killed_at = time.perf_counter()
    victim.kill(signal.SIGKILL)

    def new_master() -> str | None:
        current = survivors[0].state()["master_node_id"]
        return current if current not in (None, master) else None

    wait_until(new_master, 30, "a new master", interval=0.01)
    elapsed = time.perf_counter() - killed_at
    victim.start()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    arguments = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="exo-failover-bench-") as directory,
        LoopbackCluster(Path(directory), 3) as cluster,
    ):
        cluster.start_all()
        times = [one_failover(cluster) for _ in range(arguments.runs)]
    median = statistics.median(times)
    print(
        f"# failover bench, {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    print()
    print("| measure | value | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    print(
        f"| kill -9 master -> new master serving writes, median of {len(times)} | {median:.2f} s "
        f"| upstream exo ~{UPSTREAM_SECONDS:g} s | {median / UPSTREAM_SECONDS:.2f}x "
        f"| ≤ {TARGET_SECONDS:g} s {'✓' if median <= TARGET_SECONDS else '✗'} |"
    )
    print(f"| min / max | {min(times):.2f} s / {max(times):.2f} s | | | |")


if __name__ == "__main__":
    main()
