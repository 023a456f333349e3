"""What the cluster secret costs: events/s through the cluster and activation MB/s, with and without CURVE.

    python -m bench.curve_bench [--events 30000] [--megabytes 256] [--pipeline-rounds 3]

Activation throughput: a PUSH/PULL pair on loopback moving 1 MiB frames (a hidden state is a few
KiB to a few MiB), plain vs CURVE, interleaved, best of 3. Events: bench.events_bench's whole path,
once open and once with a secret. Target: each >= 0.8x of the open bus.

What the raw channel figure means for inference: a two-stage pipeline of real runners on loopback,
one pair started with the secret and one without, timed alternately on the same prompts: prefill
of a long prompt (one multi-MiB activation frame per hop) and decode (a few KiB per token).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import zmq

from bench.events_bench import measure
from bench.pipeline_bench import timed_generation
from exo.bus.security import derive_security
from exo.core.security import CLUSTER_KEYS_ENVIRONMENT, apply_curve
from exo.inference.client import PipelineClient, TokenSink
from exo.inference.curve import start_thread_authenticator
from exo.inference.protocol import ShardLoaded
from exo.inference.synthetic import SyntheticModelSpec, write_synthetic_model
from tests.harness.inference_helpers import ControlServer, RunnerProcess, load, spawn_runner, stop_runners

FRAME_BYTES = 1024 * 1024
SECRET = "benchmark secret"
OUT = Path(__file__).resolve().parent / "out"
PIPELINE_MODEL = SyntheticModelSpec(
    layers=4, hidden=1024, intermediate=2816, heads=16, kv_heads=8, vocab=1024
)
LONG_PROMPT = [(7 * index + 3) % 1000 + 3 for index in range(1024)]  # 4 MiB of float32 hidden state
DECODE_TOKENS = 32
_FIRST_TOKENS = itertools.count(3)


def activation_megabytes_per_second(megabytes: int, secret: str | None) -> float:
    security = derive_security(secret)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    authenticator = start_thread_authenticator(context, security)
    pull = context.socket(zmq.PULL)
    apply_curve(pull, security, server=True)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = context.socket(zmq.PUSH)
    apply_curve(push, security, server=False)
    push.connect(f"tcp://127.0.0.1:{port}")
    frame = os.urandom(FRAME_BYTES)
    push.send(frame)  # the handshake, outside the timing
    pull.recv()

    def send_all() -> None:
        for _ in range(megabytes):
            push.send(frame, copy=False)

    started = time.perf_counter()
    sender = threading.Thread(target=send_all)
    sender.start()
    for _ in range(megabytes):
        pull.recv(copy=False)
    elapsed = time.perf_counter() - started
    sender.join()
    push.close(linger=0)
    pull.close(linger=0)
    if authenticator is not None:
        authenticator.stop()
    context.term()
    return megabytes / elapsed


@contextlib.contextmanager
def cluster_secret(secret: str | None) -> Iterator[None]:
    """Runners read the cluster's keys from their environment, as a node's worker passes them."""
    previous = os.environ.pop(CLUSTER_KEYS_ENVIRONMENT, None)
    keys = derive_security(secret).environment_value()
    if keys is not None:
        os.environ[CLUSTER_KEYS_ENVIRONMENT] = keys
    try:
        yield
    finally:
        os.environ.pop(CLUSTER_KEYS_ENVIRONMENT, None)
        if previous is not None:
            os.environ[CLUSTER_KEYS_ENVIRONMENT] = previous


def two_stage_pipeline(control: ControlServer, model: Path, secret: str | None) -> list[RunnerProcess]:
    half = PIPELINE_MODEL.layers // 2
    with cluster_secret(secret):
        runners = [spawn_runner(control, "--prefill-step-size", "2048") for _ in range(2)]
    for runner, (start, end) in zip(runners, [(0, half), (half, PIPELINE_MODEL.layers)], strict=True):
        answer = load(control, runner, model, start, end, n_layers=PIPELINE_MODEL.layers)
        if not isinstance(answer, ShardLoaded):
            raise SystemExit(f"runner failed: {answer}")
    return runners


async def timed_pipeline(route: list[str], secret: str | None, rounds: int) -> list[dict[str, float]]:
    security = derive_security(secret)
    sink = TokenSink(security=security)
    await sink.start()
    client = PipelineClient(sink, security=security)
    runs: list[dict[str, float]] = []
    try:
        for _ in range(rounds):
            # a fresh first token every time, so the prefix cache never skips the prefill
            prompt = [next(_FIRST_TOKENS), *LONG_PROMPT[1:]]
            runs.append(await timed_generation(client, route, DECODE_TOKENS, prompt))
    finally:
        await client.close()
        await sink.close()
    return runs


def pipeline_with_and_without_secret(rounds: int) -> dict[str, list[dict[str, float]]]:
    """Both pipelines loaded side by side, then measured alternately, one request per turn."""
    model = OUT / "models" / "curve-l4-h1024"
    if not (model / "config.json").exists():
        write_synthetic_model(model, PIPELINE_MODEL)
    control = ControlServer()
    routes: dict[str, tuple[list[str], str | None]] = {}
    runners: list[RunnerProcess] = []
    try:
        for name, secret in (("open", None), ("curve", SECRET)):
            pair = two_stage_pipeline(control, model, secret)
            runners += pair
            routes[name] = ([runner.activation_address for runner in pair], secret)
        for route, secret in routes.values():  # warm-up: first passes allocate
            asyncio.run(timed_pipeline(route, secret, 1))
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in routes}
        for round_number in range(rounds):
            order = list(routes.items())
            for name, (route, secret) in order[::-1] if round_number % 2 else order:  # ABBA
                runs[name] += asyncio.run(timed_pipeline(route, secret, 1))
        return runs
    finally:
        stop_runners(control, runners)
        control.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--pipeline-rounds", type=int, default=3)
    arguments = parser.parse_args()
    pipeline_runs = pipeline_with_and_without_secret(arguments.pipeline_rounds)
    plain_rates: list[float] = []
    curve_rates: list[float] = []
    for _ in range(3):  # interleaved, so both see the same machine
        plain_rates.append(activation_megabytes_per_second(arguments.megabytes, None))
        curve_rates.append(activation_megabytes_per_second(arguments.megabytes, SECRET))
    plain_events = asyncio.run(measure(arguments.events, 1000, 3.0, "full"))
    curve_events = asyncio.run(measure(arguments.events, 1000, 3.0, "full", SECRET))
    plain, curve = max(plain_rates), max(curve_rates)
    print(
        f"# CURVE cost, {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    print()
    print("| measure | open bus | with secret (CURVE) | ratio | target |")
    print("|---|---|---|---|---|")
    ratio = curve / plain
    print(
        f"| activation MB/s, 1 MiB frames, best of 3 | {plain:,.0f} | {curve:,.0f} | {ratio:.2f}x "
        f"| ≥ 0.8x {'✓' if ratio >= 0.8 else '✗'} |"
    )
    ratio = curve_events.all_rate / plain_events.all_rate
    print(
        f"| events/s to all 3 nodes | {plain_events.all_rate:,.0f} | {curve_events.all_rate:,.0f} "
        f"| {ratio:.2f}x | ≥ 0.8x {'✓' if ratio >= 0.8 else '✗'} |"
    )
    open_runs, curve_runs = pipeline_runs["open"], pipeline_runs["curve"]
    for key, label, higher_is_better in (
        ("decode_tps", f"2-stage pipeline decode tok/s, best of {len(open_runs)}", True),
        ("ttft", f"2-stage pipeline prefill of {len(LONG_PROMPT)} tokens (s), best", False),
    ):
        pick = max if higher_is_better else min
        plain_value, curve_value = pick(run[key] for run in open_runs), pick(run[key] for run in curve_runs)
        ratio = curve_value / plain_value if higher_is_better else plain_value / curve_value
        medians = statistics.median(run[key] for run in curve_runs) / statistics.median(
            run[key] for run in open_runs
        )
        print(
            f"| {label} (median ratio {medians if higher_is_better else 1 / medians:.2f}x) "
            f"| {plain_value:,.3g} | {curve_value:,.3g} | {ratio:.2f}x (speed) | |"
        )


if __name__ == "__main__":
    main()
