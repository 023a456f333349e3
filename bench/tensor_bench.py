"""Tensor parallelism benchmark: a 2-rank tensor instance against one runner, and the two-core ceiling.

    .venv/bin/python -m bench.tensor_bench [--layers 16 --hidden 1536] [--rounds 3] [--tokens 32]

One run of this script, rounds interleaved (every other round reversed):
- 1 runner pinned to core 0 (`taskset`, one BLAS thread) against 2 tensor ranks pinned to cores 0
  and 1, real runner subprocesses wired as the worker wires them (LoadShard with rank/size,
  RingListening, RingFormed), driven by the asyncio client: decode tokens/s with one stream and
  the sum over 8 concurrent streams;
- the two-core ceiling from bench.core_scaling's decode-shaped loop (8 x 4096 @ 4096 x 4096) in
  the same run: what a second core adds to work that shares nothing;
- the same unpinned (2 ranks vs 1 runner, one stream);
- the cost of the ring: one all_sum of a hidden-size float32 vector between two pinned processes
  (mx.distributed ring, loopback), times the two all-reduces per layer a token needs, plus the
  all_gather of each rank's half of the vocabulary's logits (exo.inference.vocab_shard), and the
  bytes per token per link;
- the output head alone (`--head-only` runs just this): one token's logits on each of two pinned
  ranks, the whole vocab x hidden head replicated (mlx-lm's `shard` leaves it so) against this
  rank's half and the all_gather (exo.inference.vocab_shard), rounds interleaved in one process pair.
Results are ratios against baselines measured in the same run. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.core_scaling import pinned, rate
from bench.pipeline_bench import machine, timed_generation
from exo.inference.client import PipelineClient, TokenSink
from exo.inference.protocol import (
    LoadShard,
    RingFormed,
    RingListening,
    RunnerFailed,
    RunnerStarted,
    ShardLoaded,
)
from exo.inference.synthetic import SyntheticModelSpec, write_synthetic_model
from tests.harness.cluster_harness import free_port
from tests.harness.inference_helpers import ControlServer, RunnerProcess, stop_runners

OUT = Path(__file__).resolve().parent / "out"
TENSOR_JSON = OUT / "tensor_bench.json"  # what bench/__main__.py's "tensor" section reads

RING_LOOP = """
import sys, time
from exo.inference.blas import load_optimized_blas
load_optimized_blas(threads=1)
import mlx.core as mx
group = mx.distributed.init(strict=True, backend="ring")
vector = mx.ones((int(sys.argv[1]),)); mx.eval(vector)
collective = getattr(mx.distributed, sys.argv[3])
for _ in range(50): mx.eval(collective(vector, group=group))
count, started = 0, time.perf_counter()
while count < int(sys.argv[2]):
    mx.eval(collective(vector, group=group)); count += 1
if group.rank() == 0: print((time.perf_counter() - started) / count)
"""


def spawn(control: ControlServer, core: int | None) -> RunnerProcess:
    runner_id = f"runner-{uuid.uuid4().hex[:8]}"
    prefix = ["taskset", "-c", str(core)] if core is not None else []
    threads = ["--threads", "1"] if core is not None else []
    command = [
        *prefix, sys.executable, "-m", "exo.inference.runner", "--control", control.address,
        "--runner-id", runner_id, "--stats-interval", "1", *threads,
    ]  # fmt: skip
    return RunnerProcess(runner_id, subprocess.Popen(command))


def launch(
    control: ControlServer, model: Path, n_layers: int, cores: list[int | None]
) -> list[RunnerProcess]:
    """One runner (one core) or a tensor group of len(cores) ranks, loaded as the worker loads them."""
    runners = [spawn(control, core) for core in cores]
    size = len(runners)
    for rank, runner in enumerate(runners):
        control.receive(runner.runner_id, (RunnerStarted,))
        command = LoadShard("i-bench", model.name, str(model), 0, n_layers, n_layers, rank=rank, size=size)
        control.send(runner.runner_id, command)
    if size > 1:
        listening = [control.receive(runner.runner_id, (RingListening, RunnerFailed)) for runner in runners]
        if not all(isinstance(message, RingListening) for message in listening):
            raise SystemExit(f"a rank failed: {listening}")
        ring = RingFormed(
            [m.ring_address for m in listening if isinstance(m, RingListening)],
            [m.activation_address for m in listening if isinstance(m, RingListening)],
        )
        for runner in runners:
            control.send(runner.runner_id, ring)
    for runner in runners:
        answer = control.receive(runner.runner_id, (ShardLoaded, RunnerFailed), timeout=600)
        if not isinstance(answer, ShardLoaded):
            raise SystemExit(f"runner failed: {answer}")
        runner.activation_address = answer.activation_address
    return runners


async def streams_tps(client: PipelineClient, route: list[str], streams: int, tokens: int) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(timed_generation(client, route, tokens) for _ in range(streams)))
    return streams * tokens / (time.perf_counter() - started)


async def measure(routes: dict[str, list[str]], rounds: int, tokens: int) -> dict[str, list[float]]:
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)
    results: dict[str, list[float]] = {}
    try:
        for route in routes.values():
            await timed_generation(client, route, 4)  # warm-up
        names = list(routes)
        for round_number in range(rounds):
            for name in names if round_number % 2 == 0 else names[::-1]:
                route = routes[name]
                one = (await timed_generation(client, route, tokens))["decode_tps"]
                results.setdefault(f"{name} 1 stream", []).append(one)
                if "unpinned" not in name:
                    eight = await streams_tps(client, route, 8, tokens)
                    results.setdefault(f"{name} 8 streams", []).append(eight)
            print(
                f"round {round_number + 1}: { ({k: round(v[-1], 2) for k, v in results.items()}) }",
                flush=True,
            )
    finally:
        await client.close()
        await sink.close()
    return results


HEAD_LOOP = """
import json, sys, time
from exo.inference.blas import load_optimized_blas
load_optimized_blas(threads=1)
import mlx.core as mx
from mlx import nn
from exo.inference.vocab_shard import VocabShard
group = mx.distributed.init(strict=True, backend="ring")
hidden, vocab, iterations = (int(a) for a in sys.argv[1:4])
mx.random.seed(0)
head = nn.Linear(hidden, vocab, bias=False); mx.eval(head.parameters())
sharded = VocabShard(head, vocab, group); mx.eval(sharded.parameters())
x = mx.random.normal((1, 1, hidden)); mx.eval(x)
ways = {"replicated": head, "sharded": sharded.as_linear}
seconds = {name: [] for name in ways}
for round_ in range(6):
    for name in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
        for _ in range(5): mx.eval(ways[name](x))
        mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))  # start together
        started = time.perf_counter()
        for _ in range(iterations): mx.eval(ways[name](x))
        seconds[name].append((time.perf_counter() - started) / iterations)
if group.rank() == 0: print(json.dumps(seconds))
"""


def head_seconds(hidden: int, vocab: int, iterations: int = 40) -> dict[str, list[float]]:
    """Seconds per token's logits on a 2-process ring pinned to cores 0 and 1: the head whole on
    each rank against each rank's half and the gather, six interleaved rounds each."""
    with tempfile.TemporaryDirectory() as folder:
        hostfile = Path(folder) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
        command = [sys.executable, "-c", HEAD_LOOP, str(hidden), str(vocab), str(iterations)]
        processes = [
            subprocess.Popen(
                ["taskset", "-c", str(rank), *command],
                env={**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)},
                stdout=subprocess.PIPE,
                text=True,
            )
            for rank in range(2)
        ]
        outputs = [process.communicate(timeout=600)[0] for process in processes]
    return json.loads(outputs[0])


def print_head(hidden: int, vocab: int) -> dict[str, list[float]]:
    seconds = head_seconds(hidden, vocab)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    rounds = {name: ", ".join(f"{v * 1e3:.2f}" for v in values) for name, values in seconds.items()}
    print(
        f"- output head ({vocab} x {hidden} float32), ms per token on each of 2 pinned ranks: replicated "
        f"{median['replicated'] * 1e3:.2f} ({rounds['replicated']}), vocab-sharded + all_gather "
        f"{median['sharded'] * 1e3:.2f} ({rounds['sharded']}); saves "
        f"{(median['replicated'] - median['sharded']) * 1e3:.2f} ms per token"
    )
    return seconds


def ring_seconds(hidden: int, iterations: int = 2000, collective: str = "all_sum") -> float:
    """Seconds per `collective` of `hidden` float32 (per rank) over a 2-process ring pinned to
    cores 0 and 1."""
    with tempfile.TemporaryDirectory() as folder:
        hostfile = Path(folder) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
        processes = [
            subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    str(rank),
                    sys.executable,
                    "-c",
                    RING_LOOP,
                    str(hidden),
                    str(iterations),
                    collective,
                ],
                env={**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)},
                stdout=subprocess.PIPE,
                text=True,
            )
            for rank in range(2)
        ]
        outputs = [process.communicate(timeout=300)[0] for process in processes]
    return float(outputs[0])


def ceiling() -> float:
    alone = rate(pinned(0, 4096, 8, 4.0))
    pair = [pinned(core, 4096, 8, 4.0) for core in (0, 1)]
    return sum(rate(process) for process in pair) / alone


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 8/3 x hidden, rounded")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--no-unpinned", action="store_true")
    parser.add_argument("--head-only", action="store_true", help="only the output head's comparison")
    arguments = parser.parse_args()
    if arguments.head_only:
        print(f"# tensor bench, head only: {machine()}, load {os.getloadavg()[0]:.1f}")
        print_head(arguments.hidden, arguments.vocab)
        return
    intermediate = arguments.intermediate or (arguments.hidden * 8 // 3 + 127) // 128 * 128
    spec = SyntheticModelSpec(
        layers=arguments.layers, hidden=arguments.hidden, intermediate=intermediate,
        heads=arguments.heads, kv_heads=arguments.kv_heads, vocab=arguments.vocab,
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="exo-tensor-bench-"))
    model = write_synthetic_model(work / "model", spec)
    parameters = sum(f.stat().st_size for f in model.glob("*.safetensors")) // 4
    shape = f"{spec.layers} layers, hidden {spec.hidden}, intermediate {intermediate}"
    load = os.getloadavg()[0]
    print(f"# tensor bench: {machine()}, load {load:.1f}, model {parameters / 1e6:.0f}M float32 ({shape})")
    control = ControlServer()
    groups: dict[str, list[RunnerProcess]] = {}
    try:
        groups["1 pinned"] = launch(control, model, spec.layers, [0])
        groups["2 ranks pinned"] = launch(control, model, spec.layers, [0, 1])
        if not arguments.no_unpinned:
            groups["1 unpinned"] = launch(control, model, spec.layers, [None])
            groups["2 ranks unpinned"] = launch(control, model, spec.layers, [None, None])
        routes = {name: [runners[0].activation_address] for name, runners in groups.items()}
        results = asyncio.run(measure(routes, arguments.rounds, arguments.tokens))
    finally:
        for runners in groups.values():
            stop_runners(control, runners)
        control.close()
    ceilings = [ceiling() for _ in range(2)]
    per_all_reduce = ring_seconds(spec.hidden)
    half_vocab = -(-spec.vocab // 2)  # each rank's logits, gathered once per pass
    per_gather = ring_seconds(half_vocab, 500, "all_gather")
    head = print_head(spec.hidden, spec.vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    summary = {"model": {"layers": spec.layers, "hidden": spec.hidden, "parameters": parameters}}
    summary |= {
        "runs": results,
        "ceilings": ceilings,
        "all_sum_seconds": per_all_reduce,
        "all_gather_seconds": per_gather,
        "head_seconds": head,
    }
    TENSOR_JSON.write_text(json.dumps(summary, indent=1))
    median = {name: statistics.median(values) for name, values in results.items()}
    two_core = statistics.median(ceilings)
    print()
    print("| setup | decode tok/s (median) | rounds |")
    print("|---|---:|---|")
    for name, values in results.items():
        print(f"| {name} | {median[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    print()
    for streams in ("1 stream", "8 streams"):
        ratio = median[f"2 ranks pinned {streams}"] / median[f"1 pinned {streams}"]
        each = ", ".join(f"{c:.2f}" for c in ceilings)
        print(
            f"- pinned, {streams}: 2 ranks / 1 runner = {ratio:.2f}x; two-core ceiling {two_core:.2f}x "
            f"({each}); {ratio / two_core:.2f} of the ceiling"
        )
    if "1 unpinned 1 stream" in median:
        ratio = median["2 ranks unpinned 1 stream"] / median["1 unpinned 1 stream"]
        print(f"- unpinned, 1 stream: 2 ranks / 1 runner = {ratio:.2f}x")
    per_token = 2 * spec.layers * per_all_reduce + per_gather
    # A 2-rank ring all-reduce sends H*4 bytes each way; the gather sends each rank's half of the logits.
    link_bytes = 2 * spec.layers * spec.hidden * 4 + half_vocab * 4
    share = per_token * median["2 ranks pinned 1 stream"] * 100
    print(
        f"- ring: {per_all_reduce * 1e6:.0f} us per all_sum of {spec.hidden} float32 (pinned, loopback); "
        f"{2 * spec.layers} per token, plus {per_gather * 1e6:.0f} us for the all_gather of {half_vocab} "
        f"logits = {per_token * 1e3:.2f} ms per token ({share:.0f}% of a 2-rank token "
        f"at 1 stream); {link_bytes / 1024:.0f} KiB per token each way per link, plus rank 0's step "
        f"(~30 bytes)"
    )
    with contextlib.suppress(OSError):
        for file in model.iterdir():
            file.unlink()


if __name__ == "__main__":
    main()
