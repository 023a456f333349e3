"""`python -m bench`: every benchmark in one run, one table, and docs/benchmarks.md rewritten.

    python -m bench [--quick] [--rounds N] [--write-docs | --no-docs]
                    [--only serving,formats,pinned,blas,pipeline,events,replay,structured,hub]

Makes its models with `python -m exo.inference.synthetic` (into bench/out/models), starts exo nodes,
`mlx_lm.server` and mlx-lm in-process as real processes, measures them in interleaved rounds, runs
the event-store and pipeline benches as subprocesses, prints the summary table and rewrites the
generated block of docs/benchmarks.md (full runs only, unless --write-docs). Raw figures go to
bench/out/suite.json. Never run by the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import machine
from bench.existing import events_rows, pipeline_rows, replay_rows, run_bench, tensor_rows
from bench.formats_bench import run_formats
from bench.hub_bench import run_or_fail as run_hub_section
from bench.processes import eos_token_ids, linked_copy, make_model
from bench.scaling import run_blas, run_pinned
from bench.serving import run_serving
from bench.structured import run_structured
from bench.suite import Row, RunHeader, replace_generated, results_markdown, summary_table, tally
from bench.workload import (
    DEFAULT_MODEL_ARGUMENTS,
    DEFAULT_MODEL_NAME,
    DEFAULT_SETTINGS,
    QUICK_MODEL_ARGUMENTS,
    QUICK_MODEL_NAME,
    QUICK_SETTINGS,
    ModelUnderTest,
    Settings,
    model_shape_arguments,
)

OUT = machine.REPO / "bench" / "out"
DOCS = machine.REPO / "docs" / "benchmarks.md"
# The event-path sections first: run right after the inference sections (which start and stop
# processes holding gigabytes), the events bench saw one 70-90 ms stall in its 5 s latency window in
# two suite runs out of two, and none in six runs on its own or right after the pipeline bench.
SECTIONS = (
    "events",
    "replay",
    "serving",
    "formats",
    "pinned",
    "blas",
    "pipeline",
    "structured",
    "tensor",
    "hub",
)
DOCS_SKELETON = "# Benchmarks\n\nEvery figure is a ratio against a baseline measured in the same run.\n"


def parse_sections(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}: choose from {', '.join(SECTIONS)}")
    return chosen


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small model, few tokens, 2 rounds: a smoke run")
    parser.add_argument(
        "--only", type=parse_sections, default=list(SECTIONS), help="comma-separated sections"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per comparison")
    docs = parser.add_mutually_exclusive_group()
    docs.add_argument("--write-docs", action="store_true", help="rewrite docs/benchmarks.md even if partial")
    docs.add_argument("--no-docs", action="store_true", help="never rewrite docs/benchmarks.md")
    arguments = parser.parse_args(argv)
    if arguments.rounds is not None and arguments.rounds < 1:
        parser.error("--rounds must be at least 1")
    return arguments


def prepare_model(quick: bool) -> ModelUnderTest:
    name, model_arguments = (
        (QUICK_MODEL_NAME, QUICK_MODEL_ARGUMENTS) if quick else (DEFAULT_MODEL_NAME, DEFAULT_MODEL_ARGUMENTS)
    )
    path = make_model(OUT / "models", name, model_arguments)
    copy = linked_copy(path, f"{name}-copy")
    return ModelUnderTest.describe(path, copy, eos_token_ids(path))


def subprocess_sections(quick: bool, settings: Settings) -> dict[str, Callable[[], tuple[list[Row], str]]]:
    shape = model_shape_arguments(QUICK_MODEL_ARGUMENTS if quick else DEFAULT_MODEL_ARGUMENTS)

    def events() -> tuple[list[Row], str]:
        arguments = (
            ["--events", "5000", "--seconds", "2"] if quick else ["--events", "100000", "--seconds", "5"]
        )
        output = run_bench("bench.events_bench", arguments, "# events bench", 600)
        return events_rows(output), output.markdown or f"not measured: {output.failure}"

    def replay() -> tuple[list[Row], str]:
        arguments = (
            ["--events", "20000", "--repeat", "1"] if quick else ["--events", "1000000", "--repeat", "3"]
        )
        output = run_bench("bench.replay_bench", arguments, None, 900)
        return replay_rows(output), output.markdown or f"not measured: {output.failure}"

    def pipeline() -> tuple[list[Row], str]:
        tokens = str(settings.decode_tokens)
        # The full run keeps the bench's own ~200M-parameter model: the size the pipeline target names.
        model = shape if quick else []
        # Twice the rounds of the other sections: its ratio is the tightest of the suite's targets.
        rounds = str(settings.rounds * 2)
        arguments = [*model, "--rounds", rounds, "--tokens", tokens, "--skip-reference"]
        output = run_bench("bench.pipeline_bench", arguments, "Machine:", 900)
        return pipeline_rows(output), output.markdown or f"not measured: {output.failure}"

    def tensor() -> tuple[list[Row], str]:
        # The ~400M-parameter model the tensor target names (16 layers, hidden 1536); quick: the small one.
        model = [*shape, "--no-unpinned"] if quick else []
        arguments = [
            *model,
            "--rounds",
            str(settings.rounds),
            "--tokens",
            str(min(settings.decode_tokens, 32)),
        ]
        output = run_bench("bench.tensor_bench", arguments, "|", 1800)
        return tensor_rows(output), output.markdown or f"not measured: {output.failure}"

    return {"events": events, "replay": replay, "pipeline": pipeline, "tensor": tensor}


SECTION_TITLES = {
    "serving": "Serving through HTTP (exo, mlx_lm.server, mlx-lm in-process)",
    "formats": "Checkpoint formats: bfloat16 and 4-bit against float32 (bench/formats_bench.py)",
    "pinned": "Two nodes pinned to one core each",
    "blas": "MKL against the reference BLAS",
    "pipeline": "Pipelines on loopback against one process (bench/pipeline_bench.py)",
    "events": "Events through the cluster path (bench/events_bench.py)",
    "replay": "Event store: replay and appends (bench/replay_bench.py)",
    "structured": "Constrained decoding: json_schema against free decoding (bench/structured.py)",
    "tensor": "Tensor parallelism: 2 ranks against 1 runner and the two-core ceiling (bench/tensor_bench.py)",
    "hub": "Hub downloads: 3 stages, one download per cluster, resume (bench/hub_bench.py)",
}


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    settings = QUICK_SETTINGS if arguments.quick else DEFAULT_SETTINGS
    if arguments.rounds is not None:
        settings = dataclasses.replace(settings, rounds=arguments.rounds)
    started = time.perf_counter()
    load_at_start = machine.load_average()
    print(f"machine: {machine.describe_machine()}; load average {load_at_start}", flush=True)
    model = prepare_model(arguments.quick)
    print(f"model: {model.summary}", flush=True)
    rows: list[Row] = []
    details: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="exo-bench-") as directory:
        root = Path(directory)
        sections: dict[str, Callable[[], tuple[list[Row], str]]] = {
            "serving": lambda: run_serving(model, settings, root),
            "formats": lambda: run_formats(
                model, settings, root, QUICK_MODEL_ARGUMENTS if arguments.quick else DEFAULT_MODEL_ARGUMENTS
            ),
            "pinned": lambda: run_pinned(model, settings, root),
            "blas": lambda: run_blas(model, settings, root),
            "structured": lambda: run_structured(model, settings, root),
            **subprocess_sections(arguments.quick, settings),
            "hub": lambda: run_hub_section(arguments.quick, settings.rounds, root / "hub"),
        }
        for name in SECTIONS:
            if name not in arguments.only:
                continue
            section_started = time.perf_counter()
            print(f"== {name}", flush=True)
            section_rows, section_details = sections[name]()
            rows += section_rows
            elapsed = time.perf_counter() - section_started
            details.append((f"{SECTION_TITLES[name]} — {elapsed:.0f} s", section_details))
            print(summary_table(section_rows), flush=True)
    command = "python -m bench" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    header = RunHeader(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        commit=machine.commit(),
        machine=machine.describe_machine(),
        load_at_start=load_at_start,
        load_at_end=machine.load_average(),
        software=machine.software(),
        model=model.summary,
        command=command.strip(),
        duration_s=time.perf_counter() - started,
    )
    report = results_markdown(header, rows, details)
    print("\n" + summary_table(rows) + f"\n\n{tally(rows)}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "suite.json").write_text(json.dumps(_as_json(header, rows), indent=1))
    (OUT / "suite.md").write_text(report)
    full_run = not arguments.quick and list(arguments.only) == list(SECTIONS)
    if not arguments.no_docs and (full_run or arguments.write_docs):
        document = DOCS.read_text() if DOCS.exists() else DOCS_SKELETON
        DOCS.write_text(replace_generated(document, report))
        print(f"wrote {DOCS}", flush=True)
    else:
        print(f"docs/benchmarks.md left as it was (partial run); this run's report: {OUT / 'suite.md'}")


def _as_json(header: RunHeader, rows: list[Row]) -> dict[str, object]:
    return {
        "header": dataclasses.asdict(header),
        "rows": [
            {
                **dataclasses.asdict(row),
                "ratio_best": row.ratio_best,
                "ratio_median": row.ratio_median,
                "verdict": row.verdict,
                "target": str(row.target) if row.target is not None else None,
            }
            for row in rows
        ],
    }


if __name__ == "__main__":
    main()
