"""Where a Hub placement's CPU goes: CPU seconds per process from `POST /place_instance` to ready.

    python -m bench.hub_cpu [--rounds N]

The Hub bench's model, local Hub and 3-node cluster (bench/hub_bench.py). Each round: one
`snapshot_download` (this process's CPU: the client and the Hub serving it), then a placement of 3
stages with, from /proc, the CPU (user + system) each node process and each of its children (the
runners, a warm spare) used until the instance is ready, this process's CPU (the Hub serving, the
polling), and when each stage reached each status. CPU seconds hold up on a machine shared with
other work far better than wall-clock ratios, which is why this exists next to the Hub bench.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import httpx

from bench.hub_bench import FULL_SPEC, REPO, snapshot_seconds
from exo.inference.synthetic import write_synthetic_model
from tests.harness.cluster_harness import LoopbackCluster, wait_until
from tests.harness.local_hub import LocalHub

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_by_process(roots: set[int]) -> dict[int, tuple[int, float]]:
    """pid -> (the root it descends from, CPU seconds) for the roots and their descendants."""
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry)] = int(fields[1])
        seconds[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
    found: dict[int, tuple[int, float]] = {}
    for pid, cpu in seconds.items():
        ancestor, hops = pid, 0
        while ancestor not in roots and ancestor in parents and hops < 64:
            ancestor, hops = parents[ancestor], hops + 1
        if ancestor in roots:
            found[pid] = (ancestor, cpu)
    return found


def placement(cluster: LoopbackCluster, names: dict[int, str]) -> None:
    first = cluster.nodes[0]
    before = cpu_by_process(set(names))
    own = time.process_time()
    started = time.perf_counter()
    answer = first.post("/place_instance", {"model_id": REPO, "min_nodes": 3}, timeout=300)
    answer.raise_for_status()
    instance_id = answer.json()["instance_id"]
    reached: dict[tuple[str, str], float] = {}
    while True:
        instance = first.get(f"/instance/{instance_id}", timeout=30)
        for node, runner in (instance.get("runners") or {}).items():
            reached.setdefault((node, str(runner.get("status"))), time.perf_counter() - started)
        if instance["status"] == "ready":
            break
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    after = cpu_by_process(set(names))
    print(
        f"  place -> ready {seconds:.2f} s; this process (Hub, polling) {time.process_time() - own:.2f} s CPU"
    )
    print(
        "  "
        + ", ".join(
            f"{node} {status} {at:.2f}" for (node, status), at in sorted(reached.items(), key=lambda x: x[1])
        )
    )
    total = 0.0
    for pid, (root, cpu) in sorted(after.items()):
        used = cpu - before.get(pid, (root, 0.0))[1]
        total += used
        print(f"  {names[root]} {'node' if pid == root else f'child {pid}'}: {used:.2f} s CPU")
    print(f"  cluster: {total:.2f} s CPU")
    httpx.delete(f"{first.url}/instance/{instance_id}", timeout=60).raise_for_status()
    httpx.delete(f"{first.url}/models/{REPO}", timeout=120).raise_for_status()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hub_cpu", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args(argv).rounds
    with tempfile.TemporaryDirectory(prefix="exo-hub-cpu-") as directory:
        root = Path(directory)
        write_synthetic_model(root / "hub" / REPO, FULL_SPEC, shards=FULL_SPEC.layers)
        with LocalHub(root / "hub") as hub:
            cluster = LoopbackCluster(root / "cluster", 3)
            for node in cluster.nodes:
                node.env = {"HF_ENDPOINT": hub.endpoint}
            with cluster:
                cluster.start_all()
                wait_until(
                    lambda: all(len(node.state()["nodes"]) == 3 for node in cluster.nodes), 120, "3 nodes"
                )
                names = {node.process.pid: node.name for node in cluster.nodes if node.process is not None}
                for number in range(rounds):
                    print(f"round {number + 1}, load average {os.getloadavg()[0]:.1f}")
                    own = time.process_time()
                    seconds = snapshot_seconds(hub, root / f"snapshot-{number}")
                    used = time.process_time() - own
                    print(f"  snapshot_download {seconds:.2f} s; {used:.2f} s CPU (client and Hub)")
                    placement(cluster, names)


if __name__ == "__main__":
    main()
