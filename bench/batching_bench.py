"""Continuous batching and prefix cache benchmark, real runners on loopback, one script run.

    .venv/bin/python -m bench.batching_bench [--layers 8 --hidden 1024 ...] [--stages 1] [--rounds 3]

Two runner setups of the same synthetic float32 llama model, measured in interleaved rounds:
- "before": `--max-batch-size 1 --prefix-cache-tokens 0` (one request's step per forward pass, no
  cache: what the stages did before batching);
- "after": the defaults (batched steps, prefix cache on).
Per setup: decode tokens/s of one stream; aggregate tokens/s of 8 concurrent streams (all tokens
over the wall time from the first request to the last token); and a two-turn chat (a long system
prompt, then the same conversation one answer and one question longer): turn two's time to first
token. Results are ratios between numbers of the same run. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import statistics
import time
from pathlib import Path

from bench.machine import describe_machine, load_average
from exo.inference.client import GenerationRequest, PipelineClient, TokenSink
from exo.inference.synthetic import SyntheticModelSpec, write_synthetic_model
from tests.harness.inference_helpers import ControlServer, RunnerProcess, load, spawn_runner, stop_runners

OUT = Path(__file__).resolve().parent / "out"
SETUPS = {"before": ["--max-batch-size", "1", "--prefix-cache-tokens", "0"], "after": []}


def prompt(seed: int, length: int) -> list[int]:
    return [(7 * index + 13 * seed + 3) % 1000 + 3 for index in range(length)]


async def generate(client: PipelineClient, route: list[str], tokens: list[int], count: int) -> list[float]:
    """Arrival times of each token."""
    stamps: list[float] = []
    request = GenerationRequest(tokens, count, [])
    async with contextlib.aclosing(client.generate(route, request)) as stream:
        async for _ in stream:
            stamps.append(time.perf_counter())
    return stamps


async def one_round(
    client: PipelineClient, route: list[str], arguments: argparse.Namespace, seed: int
) -> dict[str, float]:
    tokens = arguments.tokens
    stamps = await generate(client, route, prompt(seed, 32), tokens)
    single = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    started = time.perf_counter()
    streams = await asyncio.gather(
        *(
            generate(client, route, prompt(seed * 100 + stream, 32), tokens)
            for stream in range(arguments.streams)
        )
    )
    aggregate = sum(len(stamps) for stamps in streams) / (max(stamps[-1] for stamps in streams) - started)
    system = prompt(seed + 7, arguments.system_tokens)
    turn_one = system + prompt(seed + 8, 24)
    answer_started = time.perf_counter()
    answer = await generate(client, route, turn_one, 8)
    del answer, answer_started
    await asyncio.sleep(0.3)  # a user reading the answer; the cache entry is confirmed meanwhile
    turn_two = turn_one + prompt(seed + 9, 8) + prompt(seed + 10, 24)
    started = time.perf_counter()
    stamps = await generate(client, route, turn_two, 2)
    return {"single_tps": single, "aggregate_tps": aggregate, "turn_two_ttft": stamps[0] - started}


async def measure(
    routes: dict[str, list[str]], arguments: argparse.Namespace
) -> dict[str, list[dict[str, float]]]:
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in routes}
    try:
        for route in routes.values():  # warm-up: first passes allocate
            await generate(client, route, prompt(999, 32), 4)
        for round_index in range(arguments.rounds):
            for name, route in routes.items():
                results[name].append(await one_round(client, route, arguments, round_index + 1))
    finally:
        await client.close()
        await sink.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=600)
    arguments = parser.parse_args()
    spec = SyntheticModelSpec(
        layers=arguments.layers, hidden=arguments.hidden, intermediate=arguments.intermediate,
        heads=arguments.heads, kv_heads=arguments.kv_heads, vocab=arguments.vocab, seed=0,
    )  # fmt: skip
    name = f"bench-l{spec.layers}-h{spec.hidden}-i{spec.intermediate}-v{spec.vocab}"
    model = OUT / "models" / name
    if not model.exists():
        write_synthetic_model(model, spec)
    layers = spec.layers
    bounds = [round(layers * index / arguments.stages) for index in range(arguments.stages + 1)]
    control = ControlServer()
    launched: dict[str, list[RunnerProcess]] = {
        setup: [spawn_runner(control, "--prefill-step-size", "2048", *flags) for _ in range(arguments.stages)]
        for setup, flags in SETUPS.items()
    }
    try:
        for runners in launched.values():
            for runner, start, end in zip(runners, bounds, bounds[1:], strict=False):
                load(control, runner, model, start, end, n_layers=layers)
        routes = {
            setup: [runner.activation_address for runner in runners] for setup, runners in launched.items()
        }
        load_before = load_average()
        results = asyncio.run(measure(routes, arguments))
    finally:
        stop_runners(control, [runner for runners in launched.values() for runner in runners])
        control.close()
    report(name, arguments, results, load_before)


def report(
    name: str,
    arguments: argparse.Namespace,
    results: dict[str, list[dict[str, float]]],
    load_before: tuple[float, ...],
) -> None:
    def median(setup: str, key: str) -> float:
        return statistics.median(run[key] for run in results[setup])

    def best(setup: str, key: str) -> float:
        values = [run[key] for run in results[setup]]
        return min(values) if key.endswith("ttft") else max(values)

    load_after = os.getloadavg()[0]
    print(f"{datetime.date.today()}, {describe_machine()}, load {load_before[0]:.1f} / {load_after:.1f}")
    print(
        f"model {name}, {arguments.stages} stage(s), {arguments.streams} streams x {arguments.tokens} tokens"
    )
    print(
        "| setup | 1 stream tok/s | 8 streams tok/s (sum) | 8 streams / 1 stream | turn two first token s |"
    )
    print("|---|---|---|---|---|")
    for setup in results:
        single, aggregate = median(setup, "single_tps"), median(setup, "aggregate_tps")
        print(
            f"| {setup} (median) | {single:.1f} | {aggregate:.1f} | {aggregate / single:.2f} | "
            f"{median(setup, 'turn_two_ttft'):.3f} |"
        )
        single, aggregate = best(setup, "single_tps"), best(setup, "aggregate_tps")
        print(
            f"| {setup} (best) | {single:.1f} | {aggregate:.1f} | {aggregate / single:.2f} | "
            f"{best(setup, 'turn_two_ttft'):.3f} |"
        )
    print(
        f"after/before, 8-stream aggregate (median): "
        f"{median('after', 'aggregate_tps') / median('before', 'aggregate_tps'):.2f}; "
        f"turn two first token, cache / no cache (median): "
        f"{median('after', 'turn_two_ttft') / median('before', 'turn_two_ttft'):.2f}"
    )
    OUT.mkdir(exist_ok=True)
    record = {
        "date": str(datetime.date.today()),
        "machine": describe_machine(),
        "model": name,
        "arguments": vars(arguments),
        "results": results,
    }
    (OUT / f"batching_bench_{arguments.stages}stage.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
