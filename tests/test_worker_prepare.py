"""A stage whose files are still downloading: its runner starts at once and imports mlx while it
waits, loads once the files are here, and is stopped when the download fails (exo.node.worker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from exo.core.events import Event, RunnerStatusUpdated, ShardAssignment
from exo.core.models import ModelInfo
from exo.core.state import Instance, State
from exo.inference.models import read_model_info
from exo.inference.synthetic import write_synthetic_model
from exo.node.worker import Worker
from tests.harness.hub_fixtures import SMALL_SPEC

NODE = "n"
INSTANCE = "i-1"
MODEL = "org/model"


def placed() -> State:
    assignment = ShardAssignment(0, SMALL_SPEC.layers, SMALL_SPEC.layers)
    instance = Instance(INSTANCE, MODEL, "Pipeline", "downloading", {NODE: assignment})
    return State(instances={INSTANCE: instance})


async def until(condition: Callable[[], bool], what: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def statuses(events: list[Event]) -> list[str]:
    return [event.status for event in events if isinstance(event, RunnerStatusUpdated)]


def mlx_mapped(pid: int) -> bool:
    """The process has mlx's native library loaded (it imported mlx.core)."""
    return "libmlx" in Path(f"/proc/{pid}/maps").read_text()


async def test_the_runner_imports_mlx_while_the_files_download_and_loads_when_they_are_here(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "models" / MODEL
    write_synthetic_model(folder, SMALL_SPEC, shards=2)
    files_here = asyncio.Event()

    async def prepare(model_id: str, assignment: ShardAssignment, downloading: Callable[[], None]) -> None:
        downloading()
        await files_here.wait()

    def find_model(model_id: str) -> ModelInfo:
        return read_model_info(folder, model_id)

    events: list[Event] = []
    worker = Worker(NODE, find_model, events.extend, prepare=prepare)
    await worker.start()
    try:
        await worker.reconcile(placed())
        runner = worker.runners[INSTANCE]
        await until(lambda: runner.status == "waiting", "the runner to say it started")
        assert runner.process is not None and runner.process.returncode is None
        assert mlx_mapped(runner.process.pid)  # paid while the files download, not after
        assert statuses(events) == ["downloading"]
        assert runner.load is None
        files_here.set()
        await until(lambda: runner.status == "ready", "the runner to load")
        assert statuses(events) == ["downloading", "loading", "ready"]
    finally:
        await worker.close()


@pytest.mark.parametrize("fails", ["before the runner started", "while the runner waits"])
async def test_a_failed_download_stops_the_waiting_runner(tmp_path: Path, fails: str) -> None:
    started: asyncio.Event = asyncio.Event()
    worker_ref: list[Worker] = []

    async def prepare(model_id: str, assignment: ShardAssignment, downloading: Callable[[], None]) -> None:
        downloading()
        if fails == "while the runner waits":
            await until(lambda: worker_ref[0].runners[INSTANCE].status == "waiting", "the runner to wait")
        started.set()
        raise OSError("the disk went away")

    def find_model(model_id: str) -> ModelInfo:
        raise AssertionError("no model is looked up after a failed download")

    events: list[Event] = []
    worker = Worker(NODE, find_model, events.extend, prepare=prepare)
    worker_ref.append(worker)
    await worker.start()
    try:
        await worker.reconcile(placed())
        runner = worker.runners[INSTANCE]
        await started.wait()
        process = runner.process
        assert process is not None
        await until(lambda: process.returncode is not None, "the runner process to exit")
        assert process.returncode == 0  # it was told to stop, not killed
        assert runner.status == "failed"
        failures = [
            event for event in events if isinstance(event, RunnerStatusUpdated) and event.status == "failed"
        ]
        assert len(failures) == 1
        assert failures[0].reason is not None and "the disk went away" in failures[0].reason
        assert "loading" not in statuses(events)
    finally:
        await worker.close()
