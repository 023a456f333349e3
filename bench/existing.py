"""The issue-1/2 benchmarks, run by the suite as subprocesses and read back from their output.

- events: `bench.events_bench` (events/s and latency through the cluster path, 3 nodes);
- replay: `bench.replay_bench` (exo-replay speed against a bare read + decode, appends);
- pipeline: `bench.pipeline_bench` (1-, 2-, 3-stage pipelines against one process, memory per
  stage), figures from its JSON (bench/out/pipeline_bench.json).
Each bench's own markdown goes into docs/benchmarks.md as it printed it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.suite import Row, Samples, at_least, at_most, failed_row, parse_markdown_tables, parse_number

REPO = Path(__file__).resolve().parent.parent
PIPELINE_JSON = REPO / "bench" / "out" / "pipeline_bench.json"
TENSOR_JSON = REPO / "bench" / "out" / "tensor_bench.json"
MIB = 2**20


@dataclass(frozen=True)
class BenchOutput:
    markdown: str
    failure: str | None
    seconds: float


def run_bench(module: str, arguments: list[str], markdown_from: str | None, timeout: float) -> BenchOutput:
    """`python -m module arguments`; the markdown is stdout from the first line starting with
    `markdown_from` (all of it when None)."""
    command = [sys.executable, "-m", module, *arguments]
    print(f"[{module}] {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    try:
        finished = subprocess.run(
            command, check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return BenchOutput("", f"{module} ran past {timeout:.0f}s", time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        tail = " ".join(finished.stderr.strip().splitlines()[-3:])
        return BenchOutput("", f"{module} exited with status {finished.returncode}: {tail}", seconds)
    lines = finished.stdout.splitlines()
    if markdown_from is not None:
        starts = [index for index, line in enumerate(lines) if line.startswith(markdown_from)]
        lines = lines[starts[0] :] if starts else lines
    return BenchOutput("\n".join(lines), None, seconds)


def events_rows(output: BenchOutput) -> list[Row]:
    what_rate = "events/s, local event -> master -> SQLite -> applied on all 3 nodes"
    what_latency = (
        "latency p99 at a steady 1,000 events/s (first second not counted), "
        "submitted -> applied back at the origin"
    )
    rate_target, latency_target = "target 20,000 events/s", "target 10 ms"
    if output.failure is not None:
        return [
            failed_row("events", what_rate, rate_target, at_least(1.0), reason=output.failure),
            failed_row("events", what_latency, latency_target, at_most(1.0), reason=output.failure),
        ]
    try:
        [table] = parse_markdown_tables(output.markdown)
        cells = {row["measure"]: row["value"] for row in table}
        rate = parse_number(next(value for key, value in cells.items() if "applied on all 3" in key))
        p99 = parse_number(next(value for key, value in cells.items() if "p99" in key))
    except (ValueError, StopIteration, KeyError) as error:
        reason = f"could not read events_bench output: {error!r}"
        return [
            failed_row("events", what_rate, rate_target, at_least(1.0), reason=reason),
            failed_row("events", what_latency, latency_target, at_most(1.0), reason=reason),
        ]
    return [
        Row("events", what_rate, Samples((rate,), "events/s"), rate_target,
            Samples((20_000.0,), "events/s"), at_least(1.0), "one run"),
        Row("events", what_latency, Samples((p99,), "ms", "lower"), latency_target,
            Samples((10.0,), "ms", "lower"), at_most(1.0), "one run"),
    ]  # fmt: skip


def replay_rows(output: BenchOutput) -> list[Row]:
    what = "exo-replay rebuild (read + decode + apply), events per CPU second"
    target_name = "target 200,000 events/s"
    if output.failure is not None:
        return [failed_row("replay", what, target_name, at_least(1.0), reason=output.failure)]
    try:
        reads, appends = parse_markdown_tables(output.markdown)[:2]
        baseline = next(row for row in reads if row["measurement"].startswith("baseline"))
        replay = next(row for row in reads if row["measurement"].startswith("replay"))
        command = next(row for row in reads if "command" in row["measurement"])
        cpu_key = "events per CPU second"
        per_batch = {row["events per commit"]: row for row in appends}
        full_64 = parse_number(per_batch["64"]["synchronous=FULL events/s"])
        normal_64 = parse_number(per_batch["64"]["synchronous=NORMAL events/s"])
        rows = [
            Row("replay", what, Samples((parse_number(replay[cpu_key]),), "events/s"), target_name,
                Samples((200_000.0,), "events/s"), at_least(1.0), "best of the bench's repeats"),
            Row("replay", "exo-replay rebuild, events per wall-clock second",
                Samples((parse_number(replay["events/s (wall)"]),), "events/s"),
                "read + msgspec decode, no apply (same run)",
                Samples((parse_number(baseline["events/s (wall)"]),), "events/s")),
            Row("replay", "`exo-replay --json`, whole command, events per wall-clock second",
                Samples((parse_number(command["events/s (wall)"]),), "events/s"),
                "read + msgspec decode, no apply (same run)",
                Samples((parse_number(baseline["events/s (wall)"]),), "events/s")),
            Row("replay", "appends, 64 events per commit, synchronous=FULL", Samples((full_64,), "events/s"),
                "synchronous=NORMAL (interleaved)", Samples((normal_64,), "events/s")),
        ]  # fmt: skip
    except (ValueError, StopIteration, KeyError) as error:
        return [
            failed_row(
                "replay",
                what,
                target_name,
                at_least(1.0),
                reason=f"could not read replay_bench output: {error!r}",
            )
        ]
    return rows


def pipeline_rows(output: BenchOutput) -> list[Row]:
    what = "2-stage pipeline on loopback (runners + PipelineClient), decode"
    baseline_name = "mlx-lm stream_generate, one process"
    if output.failure is not None:
        return [failed_row("pipeline", what, baseline_name, at_least(0.9), reason=output.failure)]
    try:
        results: dict[str, Any] = json.loads(PIPELINE_JSON.read_text())
        baseline = _decode_samples(results["single_process_mkl"]["runs"])
        runtime = int(results["runtime_peak_bytes"])
        rows: list[Row] = []
        for pipeline in results["pipelines"]:
            stages = int(pipeline["stages"])
            rows.append(
                Row("pipeline", f"{stages}-stage pipeline on loopback (runners + PipelineClient), decode",
                    _decode_samples(pipeline["runs"]), baseline_name, baseline,
                    at_least(0.9) if stages == 2 else None)
            )  # fmt: skip
        for pipeline in results["pipelines"]:
            stages = int(pipeline["stages"])
            spans_peaks = zip(pipeline["spans"], pipeline["peaks"], pipeline["shares"], strict=True)
            (start, end), peak, share = max(spans_peaks, key=lambda entry: entry[1] / (entry[2] + runtime))
            rows.append(
                Row("pipeline", f"peak RSS of the heaviest stage of {stages}, layers [{start}, {end})",
                    Samples((peak / MIB,), "MiB", "lower"), "its weight share + runtime",
                    Samples(((share + runtime) / MIB,), "MiB", "lower"), at_most(1.2))
            )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [
            failed_row(
                "pipeline",
                what,
                baseline_name,
                at_least(0.9),
                reason=f"could not read {PIPELINE_JSON}: {error!r}",
            )
        ]
    return rows


def _decode_samples(runs: list[dict[str, float]]) -> Samples:
    return Samples(tuple(float(run["decode_tps"]) for run in runs), "tok/s")


def tensor_rows(output: BenchOutput) -> list[Row]:
    """2 tensor ranks pinned to a core each against 1 pinned runner times the two-core ceiling
    measured in the same run (the target: 0.9 of what a second core can add), 1 and 8 streams."""
    baseline_name = "1 pinned runner x two-core ceiling (bench.core_scaling, same run)"
    what = "tensor instance, 2 ranks pinned to a core each, decode"
    if output.failure is not None:
        return [failed_row("tensor", what, baseline_name, at_least(0.9), reason=output.failure)]
    try:
        results: dict[str, Any] = json.loads(TENSOR_JSON.read_text())
        runs: dict[str, list[float]] = results["runs"]
        ceiling = sorted(results["ceilings"])[len(results["ceilings"]) // 2]
        rows: list[Row] = []
        for streams in ("1 stream", "8 streams"):
            single = tuple(value * ceiling for value in runs[f"1 pinned {streams}"])
            ranks = Samples(tuple(runs[f"2 ranks pinned {streams}"]), "tok/s")
            rows.append(
                Row("tensor", f"{what}, {streams}", ranks,
                    baseline_name, Samples(single, "tok/s"), at_least(0.9), note=f"ceiling {ceiling:.2f}x")
            )  # fmt: skip
        if "1 unpinned 1 stream" in runs:
            rows.append(
                Row("tensor", "tensor instance, 2 ranks unpinned, 1 stream, decode",
                    Samples(tuple(runs["2 ranks unpinned 1 stream"]), "tok/s"), "1 unpinned runner",
                    Samples(tuple(runs["1 unpinned 1 stream"]), "tok/s"))
            )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = f"could not read {TENSOR_JSON}: {error!r}"
        return [failed_row("tensor", what, baseline_name, at_least(0.9), reason=reason)]
    return rows
