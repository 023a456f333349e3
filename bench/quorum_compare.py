"""Two source trees on the quorum path's benchmarks, rounds interleaved: the events bench (events/s to
3 nodes, p99 at a steady 1,000 events/s) and the failover bench (kill -9 of the master until a new
master is named and until a command is acknowledged, median of N).

Each git ref is exported (`git archive`) to a temporary folder (a folder given instead of a ref is
used as it is: an unpacked tree with uncommitted changes) and every bench runs there, as
`python -m bench.<name>` with that folder as its working directory and PYTHONPATH, so its nodes run
that tree's `exo` (the benches themselves come from the same tree: compare refs that both hold
these benches). Rounds alternate which tree goes first; each figure is the median of its rounds.
The VM is shared: the load average is printed before and after.

    python -m bench.quorum_compare --baseline REF --candidate REF [--rounds 2] [--events 100000]
                                   [--failover-runs 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

from bench.suite import parse_markdown_tables, parse_number

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 900


def export(ref: str, into: Path) -> Path:
    """The tree at `ref`, as files under `into`; a `ref` that is a folder is used as it is."""
    if Path(ref).is_dir():
        return Path(ref).resolve()
    into.mkdir(parents=True)
    archive = into.with_suffix(".tar")
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", ref], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    archive.unlink()
    return into


def run(tree: Path, module: str, arguments: list[str]) -> str:
    """`python -m module` inside `tree`; its stdout, or RuntimeError with the tail of stderr."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    finished = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=TIMEOUT_SECONDS,
    )
    if finished.returncode != 0:
        tail = "\n".join(finished.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"{module} in {tree} exited with {finished.returncode}:\n{tail}")
    return finished.stdout


def events_figures(output: str) -> dict[str, float]:
    [table] = parse_markdown_tables(output)
    cells = {row["measure"]: row["value"] for row in table}
    return {
        "events/s to all 3 nodes": parse_number(next(v for k, v in cells.items() if "applied on all 3" in k)),
        "p50 ms at 1,000 events/s": parse_number(next(v for k, v in cells.items() if "p50" in k)),
        "p99 ms at 1,000 events/s": parse_number(next(v for k, v in cells.items() if "p99" in k)),
    }


def failover_figures(output: str) -> dict[str, float]:
    [table] = parse_markdown_tables(output)
    cells = {row["measure"]: row["median"] for row in table}
    return {
        "failover s, new master named (median)": parse_number(
            next(v for k, v in cells.items() if "names a new master" in k)
        ),
        "failover s, command acknowledged (median)": parse_number(
            next(v for k, v in cells.items() if "acknowledges a command" in k)
        ),
    }


TARGETS = {
    "events/s to all 3 nodes": ("≥ 20,000", lambda value: value >= 20_000),
    "p50 ms at 1,000 events/s": ("", lambda value: True),
    "p99 ms at 1,000 events/s": ("≤ 10 ms", lambda value: value <= 10),
    "failover s, new master named (median)": ("≤ 2 s", lambda value: value <= 2),
    "failover s, command acknowledged (median)": ("≤ 2 s", lambda value: value <= 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="git ref (or folder) of the baseline tree")
    parser.add_argument("--candidate", required=True, help="git ref (or folder) measured against it")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--failover-runs", type=int, default=10)
    parser.add_argument("--only", default="events,failover", help="events, failover or both")
    arguments = parser.parse_args()
    benches = {name.strip() for name in arguments.only.split(",")}
    load_before = " ".join(f"{figure:.2f}" for figure in os.getloadavg())
    figures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory(prefix="exo-quorum-compare-") as directory:
        trees = {
            "baseline": export(arguments.baseline, Path(directory) / "baseline"),
            "candidate": export(arguments.candidate, Path(directory) / "candidate"),
        }
        for round_number in range(arguments.rounds):
            order = ["baseline", "candidate"] if round_number % 2 == 0 else ["candidate", "baseline"]
            for which in order:
                started = time.perf_counter()
                if "events" in benches:
                    output = run(trees[which], "bench.events_bench", ["--events", str(arguments.events)])
                    for key, value in events_figures(output).items():
                        figures[key][which].append(value)
                if "failover" in benches:
                    output = run(
                        trees[which], "bench.failover_bench", ["--runs", str(arguments.failover_runs)]
                    )
                    for key, value in failover_figures(output).items():
                        figures[key][which].append(value)
                print(
                    f"round {round_number + 1} {which}: {time.perf_counter() - started:.0f}s, "
                    f"{ {key: values[which][-1] for key, values in figures.items()} }",
                    file=sys.stderr,
                    flush=True,
                )
    load_after = " ".join(f"{figure:.2f}" for figure in os.getloadavg())
    print(
        f"# quorum path: {arguments.candidate} against {arguments.baseline}, {arguments.rounds} interleaved "
        f"rounds, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load average before "
        f"{load_before}, after {load_after}"
    )
    print()
    print(f"| measure | {arguments.baseline} | {arguments.candidate} | ratio | target | candidate meets it |")
    print("|---|---|---|---|---|---|")
    for key, by_tree in figures.items():
        baseline = statistics.median(by_tree["baseline"])
        candidate = statistics.median(by_tree["candidate"])
        target, met = TARGETS[key]
        verdict = ("✓" if met(candidate) else "✗") if target else ""
        print(
            f"| {key} (rounds: {', '.join(f'{v:g}' for v in by_tree['baseline'])} / "
            f"{', '.join(f'{v:g}' for v in by_tree['candidate'])}) | {baseline:,.2f} | {candidate:,.2f} "
            f"| {candidate / baseline:.2f}x | {target} | {verdict} |"
        )


if __name__ == "__main__":
    main()
