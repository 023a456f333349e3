"""Pipeline inference benchmark: 1-, 2- and 3-stage pipelines on loopback vs mlx-lm in one process.

    .venv/bin/python -m bench.pipeline_bench [--layers 16 --hidden 1024 ...] [--tokens 64]

Same ~200M-parameter float32 synthetic model, same prompt, one run of this script:
- decode tokens/s and time to first token of mlx-lm `stream_generate` in one process (the
  baseline), and of real runner subprocesses wired into 1-3 stages, driven by the asyncio client;
- each stage's peak resident memory against its share of the weights plus the runtime (the peak of
  a runner holding a tiny model);
- decode tokens/s with MKL against mlx's reference BLAS (EXO_BLAS=reference), both in one process.
Results are ratios against the baseline measured in the same run. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from exo.inference.client import GenerationRequest, PipelineClient, TokenSink
from exo.inference.models import get_model
from exo.inference.protocol import RunnerStats, ShardLoaded
from exo.inference.synthetic import BUILTIN_SPEC, SyntheticModelSpec, write_synthetic_model
from tests.harness.inference_helpers import ControlServer, RunnerProcess, load, spawn_runner, stop_runners

OUT = Path(__file__).resolve().parent / "out"
PROMPT = [(7 * index + 3) % 1000 + 3 for index in range(64)]  # the same 64 token ids everywhere

# A persistent one-process baseline: reads a token count per line, answers one JSON line per run.
SINGLE_PROCESS = """
import json, sys, time
from exo.inference.blas import load_optimized_blas
blas = load_optimized_blas()
import mlx.core as mx, mlx_lm
model, tokenizer = mlx_lm.load(sys.argv[1])
prompt = json.loads(sys.argv[2])
tokenizer.eos_token_ids = []
for line in sys.stdin:
    tokens, prompt_length = map(int, line.split())
    started = time.perf_counter(); stamps = []
    for response in mlx_lm.stream_generate(model, tokenizer, prompt[:prompt_length], max_tokens=tokens):
        stamps.append(time.perf_counter())
    print(json.dumps({"blas": blas.library, "ttft": stamps[0] - started,
                      "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                      "peak_memory": mx.get_peak_memory()}), flush=True)
"""


class SingleProcess:
    """mlx-lm's stream_generate in its own process (so it gets its own BLAS choice)."""

    def __init__(self, model: Path, blas: str) -> None:
        environment = {**os.environ, "EXO_BLAS": "reference" if blas == "reference" else ""}
        self.process = subprocess.Popen(
            [sys.executable, "-c", SINGLE_PROCESS, str(model), json.dumps(PROMPT)],
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, tokens: int, prompt_length: int = len(PROMPT)) -> dict[str, float]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{tokens} {prompt_length}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


def route_of(runners: list[RunnerProcess]) -> list[str]:
    return [runner.activation_address for runner in runners]


def even_split(n_layers: int, stages: int) -> list[tuple[int, int]]:
    base, extra = divmod(n_layers, stages)
    spans, start = [], 0
    for index in range(stages):
        end = start + base + (1 if index < extra else 0)
        spans.append((start, end))
        start = end
    return spans


async def timed_generation(
    client: PipelineClient, route: list[str], tokens: int, prompt: list[int] = PROMPT
) -> dict[str, float]:
    started = time.perf_counter()
    stamps: list[float] = []
    request = GenerationRequest(prompt, tokens, [])
    async with contextlib.aclosing(client.generate(route, request)) as stream:
        async for _ in stream:
            stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - started, "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def peak_of(control: ControlServer, runner: RunnerProcess) -> int:
    stats = control.receive(runner.runner_id, (RunnerStats,))
    assert isinstance(stats, RunnerStats)
    return stats.peak_resident_bytes


def launch(
    control: ControlServer, model: Path, spans: list[tuple[int, int]], n_layers: int
) -> list[RunnerProcess]:
    # mlx-lm's default prefill chunk, so both sides compute the same passes
    runners = [spawn_runner(control, "--prefill-step-size", "2048", "--stats-interval", "1") for _ in spans]
    for runner, (start, end) in zip(runners, spans, strict=True):
        answer = load(control, runner, model, start, end, n_layers=n_layers)
        if not isinstance(answer, ShardLoaded):
            raise SystemExit(f"runner failed: {answer}")
    return runners


def runtime_peak(tiny: Path) -> int:
    """Peak RSS of a runner holding a tiny model: the interpreter, MLX and mlx-lm themselves."""
    control = ControlServer()
    [runner] = launch(control, tiny, [(0, BUILTIN_SPEC.layers)], BUILTIN_SPEC.layers)
    try:
        asyncio.run(_one_generation([runner.activation_address]))
        return peak_of(control, runner)
    finally:
        stop_runners(control, [runner])
        control.close()


async def _one_generation(route: list[str]) -> None:
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)
    try:
        await timed_generation(client, route, 8)
    finally:
        await client.close()
        await sink.close()


def machine() -> str:
    cpu = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{platform.system()} {platform.machine()}, {cpu}, {len(os.sched_getaffinity(0))} usable cores"


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """Fastest decode and first token over the rounds (other load on the machine only slows runs),
    and the medians."""
    return {
        "decode_tps": max(run["decode_tps"] for run in runs),
        "ttft": min(run["ttft"] for run in runs),
        "median_decode_tps": statistics.median(run["decode_tps"] for run in runs),
        "median_ttft": statistics.median(run["ttft"] for run in runs),
    }


def compare_blas(model: Path, rounds: int, tokens: int = 16, prompt_length: int = 8) -> dict[str, object]:
    """Decode with MKL and with the reference BLAS, one process each, interleaved. A short prompt:
    prefill with the reference BLAS takes minutes."""
    processes = {"mkl": SingleProcess(model, "mkl"), "reference": SingleProcess(model, "reference")}
    runs: dict[str, list[dict[str, float]]] = {"mkl": [], "reference": []}
    try:
        for process in processes.values():
            process.run(2, prompt_length)
        for _ in range(rounds):
            for blas, process in processes.items():
                runs[blas].append(process.run(tokens, prompt_length))
            print("blas round:", {blas: measured[-1] for blas, measured in runs.items()}, flush=True)
    finally:
        for process in processes.values():
            process.close()
    return {blas: {**best(measured), "runs": measured} for blas, measured in runs.items()}


async def measure_rounds(
    baseline: SingleProcess, routes: dict[int, list[str]], tokens: int, rounds: int
) -> tuple[list[dict[str, float]], dict[int, list[dict[str, float]]]]:
    """Baseline and every pipeline measured in turn, `rounds` times, so load spikes hit all alike
    (this VM's speed drifts by 10-15% over tens of seconds: many short rounds, not a few long ones)."""
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)
    baseline_runs: list[dict[str, float]] = []
    pipeline_runs: dict[int, list[dict[str, float]]] = {stages: [] for stages in routes}
    try:
        baseline.run(4)  # warm-up
        for route in routes.values():
            await timed_generation(client, route, 4)
        setups: list[int | None] = [None, *routes]  # None: the baseline
        for round_number in range(rounds):
            # Every other round in reverse, so a machine that speeds up or slows down over a round
            # favours no setup.
            for setup in setups if round_number % 2 == 0 else setups[::-1]:
                if setup is None:
                    baseline_runs.append(baseline.run(tokens))
                else:
                    pipeline_runs[setup].append(await timed_generation(client, routes[setup], tokens))
            print(f"round {round_number + 1}: baseline {baseline_runs[-1]}, "
                  f"pipelines {[runs[-1] for runs in pipeline_runs.values()]}", flush=True)  # fmt: skip
    finally:
        await client.close()
        await sink.close()
    return baseline_runs, pipeline_runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=64, help="tokens to decode per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each setup, interleaved")
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow reference-BLAS run")
    arguments = parser.parse_args()
    spec = SyntheticModelSpec(
        layers=arguments.layers, hidden=arguments.hidden, intermediate=arguments.intermediate,
        heads=arguments.heads, kv_heads=arguments.kv_heads, vocab=arguments.vocab, seed=0,
    )  # fmt: skip
    models = OUT / "models"
    name = f"bench-l{spec.layers}-h{spec.hidden}-i{spec.intermediate}-v{spec.vocab}"
    model = models / name
    if not (model / "config.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        write_synthetic_model(model, spec)
    tiny = models / "exo-tiny"
    if not (tiny / "config.json").is_file():
        write_synthetic_model(tiny, BUILTIN_SPEC)
    info = get_model(models, name)
    parameters = info.total_weight_bytes // 4
    results: dict[str, object] = {"machine": machine(), "date": datetime.date.today().isoformat()}
    results["model"] = {"id": name, "parameters": parameters, "weight_bytes": info.total_weight_bytes}
    size = info.total_weight_bytes / 2**20
    print(f"model {name}: {parameters / 1e6:.0f}M parameters, {size:.0f} MiB", flush=True)

    results["runtime_peak_bytes"] = runtime_peak(tiny)
    control = ControlServer()
    spans = {stages: even_split(spec.layers, stages) for stages in (1, 2, 3)}
    launched: dict[int, list[RunnerProcess]] = {}
    baseline = SingleProcess(model, "mkl")
    try:
        for stages, stage_spans in spans.items():
            launched[stages] = launch(control, model, stage_spans, spec.layers)
        routes = {
            stages: [runner.activation_address for runner in runners] for stages, runners in launched.items()
        }
        baseline_runs, pipeline_runs = asyncio.run(
            measure_rounds(baseline, routes, arguments.tokens, arguments.rounds)
        )
        peaks = {
            stages: [peak_of(control, runner) for runner in runners] for stages, runners in launched.items()
        }
    finally:
        baseline.close()
        stop_runners(control, [runner for runners in launched.values() for runner in runners])
        control.close()
    results["single_process_mkl"] = {**best(baseline_runs), "runs": baseline_runs}
    results["pipelines"] = [
        {
            "stages": stages,
            "spans": spans[stages],
            **best(pipeline_runs[stages]),
            "runs": pipeline_runs[stages],
            "peaks": peaks[stages],
            "shares": [info.shard_weight_bytes(start, end) for start, end in spans[stages]],
        }
        for stages in spans
    ]
    if not arguments.skip_reference:
        results["blas_comparison"] = compare_blas(model, arguments.rounds)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pipeline_bench.json").write_bytes(msgspec.json.format(msgspec.json.encode(results)))
    print(report(results))


def report(results: dict[str, object]) -> str:
    baseline = results["single_process_mkl"]
    assert isinstance(baseline, dict)
    runtime = results["runtime_peak_bytes"]
    assert isinstance(runtime, int)
    mib = 2**20

    def row(label: str, measured: dict[str, float]) -> str:
        return (
            f"| {label} | {measured['decode_tps']:.2f} "
            f"| {measured['decode_tps'] / baseline['decode_tps']:.2f} "
            f"| {measured['median_decode_tps']:.2f} "
            f"| {measured['median_decode_tps'] / baseline['median_decode_tps']:.2f} "
            f"| {measured['ttft']:.2f} | {measured['median_ttft']:.2f} |"
        )

    lines = [
        f"Machine: {results['machine']}; date {results['date']}; model {results['model']}",
        "",
        "| setup | decode tok/s (best) | x one process | decode tok/s (median) | x one process "
        "| first token s (best) | first token s (median) |",
        "|---|---|---|---|---|---|---|",
        row("mlx-lm stream_generate, one process", baseline),
    ]
    stage_results = results["pipelines"]
    assert isinstance(stage_results, list)
    lines += [
        row(f"{measured['stages']} stage(s), runners on loopback", measured) for measured in stage_results
    ]
    comparison = results.get("blas_comparison")
    if isinstance(comparison, dict):
        mkl, reference = comparison["mkl"], comparison["reference"]
        lines += [
            "",
            "| BLAS (one process, 8-token prompt) | decode tok/s (best) | decode tok/s (median) "
            "| first token s (median) |",
            "|---|---|---|---|",
            f"| MKL | {mkl['decode_tps']:.2f} | {mkl['median_decode_tps']:.2f} | {mkl['median_ttft']:.2f} |",
            f"| reference (EXO_BLAS=reference) | {reference['decode_tps']:.2f} "
            f"| {reference['median_decode_tps']:.2f} | {reference['median_ttft']:.2f} |",
            f"| MKL / reference | {mkl['decode_tps'] / reference['decode_tps']:.2f} "
            f"| {mkl['median_decode_tps'] / reference['median_decode_tps']:.2f} | |",
        ]
    lines += [
        "",
        f"Runtime (peak RSS of a runner holding exo-tiny): {runtime / mib:.0f} MiB",
        "",
        "| stages | layers | weight share (MiB) | peak RSS (MiB) | peak / (share + runtime) |",
        "|---|---|---|---|---|",
    ]
    for measured in stage_results:
        rows = zip(measured["spans"], measured["shares"], measured["peaks"], strict=True)
        for (start, end), share, peak in rows:
            lines.append(
                f"| {measured['stages']} | [{start}, {end}) | {share / mib:.0f} | {peak / mib:.0f} | "
                f"{peak / (share + runtime):.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
