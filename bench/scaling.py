"""Scaling with cores (two nodes pinned to one core each) and the BLAS choice.

- pinned: a two-node cluster, each node (and so its runners) pinned to its own core with
  `taskset -c`; model X placed on one node (one stage, one core) against its copy X2 as a two-stage
  pipeline over both nodes (two cores), and against a third copy X3 placed twice, one replica per
  node (the API spreads generations over them), N concurrent streams each, interleaved.
- blas: mlx-lm's stream_generate in one process with MKL against the reference BLAS
  (EXO_BLAS=reference), short prompt (prefill on the reference BLAS takes minutes), interleaved.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from bench.http_stream import chat_body, many_chats
from bench.machine import taskset_path, usable_cores
from bench.processes import ExoCluster, InProcessBaseline, ProcessFailed, linked_copy
from bench.rounds import Interleaved
from bench.suite import Row, at_least
from bench.workload import ModelUnderTest, Settings, user_messages

PROMPT_TOKEN_IDS = [(7 * index + 3) % 1000 + 3 for index in range(64)]  # as bench.pipeline_bench


def run_pinned(model: ModelUnderTest, settings: Settings, root: Path) -> tuple[list[Row], str]:
    rounds = Interleaved("pinned")
    cores = usable_cores()
    n = settings.streams
    what = f"aggregate, {n} streams, 2 nodes pinned to one core each (2 stages)"
    replicas_what = f"aggregate, {n} streams, 2 nodes pinned to one core each (a replica on each)"
    baseline = "1 node pinned to one core"
    setups = ("one", "two", "replicas")
    if taskset_path() is None or len(cores) < 2:
        reason = "taskset (util-linux) not found" if taskset_path() is None else f"only {len(cores)} core"
        for setup in setups:
            rounds.fail(setup, reason)
    else:
        with contextlib.ExitStack() as stack:
            cluster = ExoCluster(root / "pinned", model.path.parent, 2, pins=[[cores[0]], [cores[1]]])
            stack.callback(cluster.stop)
            urls: dict[str, tuple[str, str]] = {}
            replica_model = linked_copy(model.path, f"{model.path.name}-replica")
            try:
                cluster.start()
                for setup, instance_model, stages in (("one", model.path, 1), ("two", model.copy, 2)):
                    instance = cluster.place(instance_model.name, stages)
                    urls[setup] = (cluster.entry_url(instance), instance_model.name)
                placing = [cluster.start_placing(replica_model.name, 1) for _ in range(2)]
                first, second = (cluster.wait_instance_ready(replica_model.name, each) for each in placing)
                if set(first["shard_assignments"]) == set(second["shard_assignments"]):
                    rounds.fail("replicas", "both replicas were placed on the same node")
                else:
                    urls["replicas"] = (cluster.entry_url(first), replica_model.name)
            except ProcessFailed as error:
                for setup in setups:
                    rounds.fail(setup, f"pinned cluster did not start: {error}")
            for number in range(-1, settings.rounds):  # round -1 warms up
                shift = number % len(setups)
                for setup in setups[shift:] + setups[:shift]:
                    if setup not in urls:
                        continue
                    url, name = urls[setup]
                    bodies = [
                        chat_body(name, user_messages(f"Pinned {setup} {number:03d}-{index:02d}",
                                  settings.concurrent_user_chars), settings.concurrent_tokens,
                                  model.eos_ids)
                        for index in range(n if number >= 0 else 1)
                    ]  # fmt: skip
                    rounds.attempt(
                        setup,
                        lambda url=url, bodies=bodies: {
                            "aggregate_tps": many_chats(url, bodies).aggregate_tps
                        },
                    )
                if number == -1:
                    rounds.samples.clear()
                print(f"[pinned] round {number + 1}/{settings.rounds} done", flush=True)
    row = rounds.row(what, "two.aggregate_tps", baseline, "one.aggregate_tps", "tok/s", target=at_least(1.7))
    replicas = rounds.row(
        replicas_what, "replicas.aggregate_tps", baseline, "one.aggregate_tps", "tok/s", target=at_least(1.7)
    )
    details = (
        f"Cores {cores[:2]} (of {len(cores)} usable), `taskset -c` on each node process; its runners "
        "inherit the affinity and size their BLAS thread pool to it (one thread). Requests go to the "
        "API of the node holding the first stage (for the replicas: the first replica's node, whose "
        "API sends each generation to the replica with fewer running)."
    )
    return [row, replicas], details


def run_blas(model: ModelUnderTest, settings: Settings, root: Path) -> tuple[list[Row], str]:
    rounds = Interleaved("blas")
    prompt = PROMPT_TOKEN_IDS[: settings.blas_prompt_tokens]
    bias = {str(token): -100 for token in model.eos_ids}
    request = {"prompt_tokens": prompt, "max_tokens": settings.blas_tokens, "logit_bias": bias}
    libraries: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        processes = {
            "mkl": InProcessBaseline(model.path, root / "blas-mkl.log"),
            "reference": InProcessBaseline(model.path, root / "blas-reference.log", reference_blas=True),
        }
        for process in processes.values():
            stack.callback(process.close)
        for setup, process in processes.items():
            try:
                process.wait_ready()
                libraries[setup] = process.blas
                process.run({**request, "max_tokens": 2})  # warm-up
            except ProcessFailed as error:
                rounds.fail(setup, str(error))
        for number in range(settings.rounds):
            order = list(processes.items()) if number % 2 == 0 else list(processes.items())[::-1]
            for setup, process in order:
                rounds.attempt(setup, lambda process=process: _decode(process, request))
            print(f"[blas] round {number + 1}/{settings.rounds} done", flush=True)
    note = ", ".join(f"{setup} process reports {library}" for setup, library in libraries.items())
    row = rounds.row(
        "decode after start-up, 1 stream in-process (MKL)",
        "mkl.decode_tps",
        "same model on the reference BLAS (EXO_BLAS=reference)",
        "reference.decode_tps",
        "tok/s",
        target=at_least(3.0),
        note=note,
    )
    ttft = rounds.row(
        f"time to first token, {len(prompt)}-token prompt (MKL)",
        "mkl.ttft",
        "reference BLAS",
        "reference.ttft",
        "s",
        better="lower",
    )
    details = (
        f"mlx-lm stream_generate in one process per BLAS, {len(prompt)}-token prompt, "
        f"{settings.blas_tokens} tokens decoded per round."
    )
    return [row, ttft], details


def _decode(process: InProcessBaseline, request: dict[str, object]) -> dict[str, float]:
    answer = process.run(request)
    return {"decode_tps": float(answer["decode_tps"]), "ttft": float(answer["ttft"])}
