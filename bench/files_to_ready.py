"""Seconds from "a stage's files are here" to its runner ready, when the runner was started while
the files downloaded (what place_instance of a Hub model adds after the download).

    PYTHONPATH=TREE python -m bench.files_to_ready [--model-dir DIR]

One worker (exo.node.worker) starts a runner for layers [0, 3) of the Hub bench's model (built
into DIR when missing) with a prepare hook standing in for the download: it returns 0.5 s after
the runner process said it started. Prints the seconds from the hook returning to `ready`, and
from the start. It runs against whichever tree PYTHONPATH names, so two commits can be compared
with rounds interleaved (docs/benchmarks.md, Hub downloads).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.hub_bench import FULL_SPEC
from exo.core.events import ShardAssignment
from exo.core.state import Instance, State
from exo.inference.models import read_model_info
from exo.inference.synthetic import write_synthetic_model
from exo.node.worker import LocalRunner, Worker

DOWNLOAD_AFTER_START_SECONDS = 0.5


async def until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the runner did not get there")
        await asyncio.sleep(0.005)


def said_started(runner: LocalRunner | None) -> bool:
    # `started` is how commits before the runner's "waiting" status said it.
    return runner is not None and (bool(getattr(runner, "started", False)) or runner.status == "waiting")


async def measure(folder: Path) -> tuple[float, float, str]:
    workers: list[Worker] = []
    handed = [0.0]

    async def prepare(model_id: str, assignment: ShardAssignment, downloading: Callable[[], None]) -> None:
        downloading()
        await until(lambda: said_started(workers[0].runners.get("i")), 120)
        await asyncio.sleep(DOWNLOAD_AFTER_START_SECONDS)  # the download ends a little later
        handed[0] = time.perf_counter()

    worker = Worker(
        "n", lambda model_id: read_model_info(folder, model_id), lambda _events: None, prepare=prepare
    )
    workers.append(worker)
    await worker.start()
    try:
        assignment = ShardAssignment(0, 3, FULL_SPEC.layers)
        instance = Instance("i", "org/model", "Pipeline", "downloading", {"n": assignment})
        started = time.perf_counter()
        await worker.reconcile(State(instances={"i": instance}))
        await until(lambda: worker.runners["i"].status in ("ready", "failed"), 300)
        done = time.perf_counter()
        return done - handed[0], done - started, worker.runners["i"].status
    finally:
        await worker.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.files_to_ready", description=__doc__)
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "exo-files-to-ready-model"
    )
    arguments = parser.parse_args(argv)
    folder: Path = arguments.model_dir
    if not folder.is_dir():
        write_synthetic_model(folder, FULL_SPEC, shards=FULL_SPEC.layers)
    after_files, in_all, status = asyncio.run(measure(folder))
    print(f"files here -> {status}: {after_files:.3f} s (from the start: {in_all:.3f} s)")


if __name__ == "__main__":
    main()
