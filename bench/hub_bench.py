"""Hub downloads (issue 13): one download per cluster, shard-only files, speed, and resume.

    python -m bench.hub_bench [--quick] [--rounds N]

A synthetic model (~400 MB float32, 8 layers in 8 weight files; `--quick`: ~40 MB) is served by
the local Hub of the tests (tests/harness/local_hub.py) on loopback. Interleaved rounds of:

- baseline: `huggingface_hub.snapshot_download` of the model's files to one folder;
- exo: a 3-node cluster (started once) places the model as 3 stages (`POST /place_instance`,
  `min_nodes` 3) and the time to `ready` is taken; then the instance and the files are deleted.
  The Hub's bytes served during the placement, and each node's bytes on disk against its
  stage's share of the weights plus the non-layer files, are recorded;
- resume: `exo models pull` (no node: straight to a models dir) is killed with SIGKILL once half
  the model's bytes are on disk, then run again; the bytes the Hub serves after the restart are
  compared with the model's size.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.suite import Row, Samples, at_most, failed_row, summary_table
from exo.inference.models import read_model_info
from exo.inference.synthetic import SyntheticModelSpec, write_synthetic_model
from tests.harness.cluster_harness import LoopbackCluster, wait_until
from tests.harness.local_hub import LocalHub

SECTION = "Hub downloads"
REPO = "bench-org/model"
FULL_SPEC = SyntheticModelSpec(layers=8, hidden=1024, intermediate=2816, heads=16, kv_heads=8, vocab=1024)
QUICK_SPEC = SyntheticModelSpec(layers=6, hidden=512, intermediate=1024, heads=8, kv_heads=4, vocab=512)
MB = 1_000_000


def model_bytes(hub: LocalHub) -> int:
    return hub.model_size(REPO)


def snapshot_seconds(hub: LocalHub, target: Path) -> float:
    from huggingface_hub import snapshot_download

    started = time.perf_counter()
    snapshot_download(
        REPO,
        local_dir=target,
        endpoint=hub.endpoint,
        allow_patterns=["*.json", "*.safetensors"],
        max_workers=8,
    )
    return time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def place_round(cluster: LoopbackCluster, hub: LocalHub) -> tuple[float, int, float]:
    """(seconds to ready, Hub bytes served, worst disk / (stage share + non-layer files))."""
    first = cluster.nodes[0]
    served = hub.stats.bytes_served
    started = time.perf_counter()
    answer = first.post("/place_instance", {"model_id": REPO, "min_nodes": 3}, timeout=300)
    answer.raise_for_status()
    instance_id = answer.json()["instance_id"]
    wait_until(
        lambda: first.get(f"/instance/{instance_id}")["status"] == "ready", 600, "ready", interval=0.02
    )
    seconds = time.perf_counter() - started
    hub_bytes = hub.stats.bytes_served - served
    info = read_model_info(hub.root / REPO, REPO)
    support = sum(
        path.stat().st_size for path in (hub.root / REPO).iterdir() if not path.name.endswith(".safetensors")
    )
    worst = 0.0
    for node_id, shard in first.get(f"/instance/{instance_id}")["shard_assignments"].items():
        node = next(each for each in cluster.nodes if each.name == node_id)
        held = folder_bytes(node.data_dir / "models" / REPO)
        share = info.shard_weight_bytes(shard["start_layer"], shard["end_layer"])
        worst = max(worst, held / (share + support))
    httpx.delete(f"{first.url}/instance/{instance_id}", timeout=60).raise_for_status()
    httpx.delete(f"{first.url}/models/{REPO}", timeout=120).raise_for_status()
    return seconds, hub_bytes, worst


def resume_round(hub: LocalHub, models_dir: Path) -> int:
    """Hub bytes served after a pull killed at half the model's bytes is run again."""
    total = model_bytes(hub)
    command = [sys.executable, "-m", "exo.node", "models", "--api-url", "http://127.0.0.1:9"]
    command += ["--models-dir", str(models_dir), "pull", REPO]
    environment = {**os.environ, "HF_ENDPOINT": hub.endpoint}
    hub.throttle_bytes_per_second = 200 * MB  # so the half-way point can be caught
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(
            lambda: folder_bytes(models_dir) >= total // 2, 300, "half the model on disk", interval=0.01
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    hub.throttle_bytes_per_second = None
    served = hub.stats.bytes_served
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return hub.stats.bytes_served - served


def run_hub(quick: bool, rounds: int, root: Path) -> tuple[list[Row], str]:
    spec = QUICK_SPEC if quick else FULL_SPEC
    hub_root = root / "hub"
    write_synthetic_model(hub_root / REPO, spec, shards=spec.layers)
    baseline: list[float] = []
    placed: list[float] = []
    hub_bytes: list[float] = []
    disk: list[float] = []
    resumed: list[float] = []
    with LocalHub(hub_root) as hub:
        size = model_bytes(hub)
        cluster = LoopbackCluster(root / "cluster", 3)
        for node in cluster.nodes:
            node.env = {"HF_ENDPOINT": hub.endpoint}
        with cluster:
            cluster.start_all()
            wait_until(lambda: all(len(node.state()["nodes"]) == 3 for node in cluster.nodes), 120, "3 nodes")
            for number in range(rounds):
                baseline.append(snapshot_seconds(hub, root / f"snapshot-{number}"))
                seconds, served, worst = place_round(cluster, hub)
                placed.append(seconds)
                hub_bytes.append(served / MB)
                disk.append(worst)
                resumed.append(resume_round(hub, root / f"resume-{number}") / MB)
    size_mb = Samples((size / MB,) * rounds, "MB", "lower")
    rows = [
        Row(SECTION, "Hub bytes served placing 3 stages", Samples(tuple(hub_bytes), "MB", "lower"),
            "the model's size", size_mb, at_most(1.02),
            note="includes the safetensors header ranges the placing node reads for the memory math"),
        Row(SECTION, "largest node's disk / (its stage's share + non-layer files)",
            Samples(tuple(disk), "x", "lower"), "1", Samples((1.0,) * rounds, "x", "lower"), at_most(1.1)),
        Row(SECTION, "place_instance to ready, 3 stages", Samples(tuple(placed), "s", "lower"),
            "snapshot_download to one node", Samples(tuple(baseline), "s", "lower"), at_most(1.3)),
        Row(SECTION, "Hub bytes after a pull killed at 50% is restarted",
            Samples(tuple(resumed), "MB", "lower"), "the model's size", size_mb, at_most(0.6)),
    ]  # fmt: skip
    details = (
        f"Model: {spec.layers} layers, hidden {spec.hidden}, float32, {spec.layers} weight files, "
        f"{size / MB:.0f} MB in all; {rounds} interleaved round(s); the Hub is tests/harness/local_hub.py "
        "on loopback."
    )
    return rows, details


def run_or_fail(quick: bool, rounds: int, root: Path) -> tuple[list[Row], str]:
    try:
        return run_hub(quick, rounds, root)
    except (AssertionError, OSError, subprocess.SubprocessError, httpx.HTTPError) as error:
        reason = f"{type(error).__name__}: {error}"
        return [failed_row(SECTION, "Hub downloads", "—", None, reason=reason)], f"not measured: {reason}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hub_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="exo-hub-bench-") as directory:
        rows, details = run_or_fail(arguments.quick, arguments.rounds, Path(directory))
    print(details)
    print(summary_table(rows))


if __name__ == "__main__":
    main()
