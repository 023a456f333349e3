"""A stage whose files are still downloading: its runner starts at once and imports mlx while it
waits, loads once the files are here, and is stopped when the download fails (exo.node.worker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
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


def downloading_until(
    tmp_path: Path, files_here: asyncio.Event
) -> tuple[Callable[[str], ModelInfo], Callable[[str, ShardAssignment, Callable[[], None]], Awaitable[None]]]:
    """A model on disk, and a download step that reports `downloading` and returns only once
    `files_here` is set: the runner's wait for its files, held open by the test."""
    folder = tmp_path / "models" / MODEL
    write_synthetic_model(folder, SMALL_SPEC, shards=2)

    async def prepare(model_id: str, assignment: ShardAssignment, downloading: Callable[[], None]) -> None:
        downloading()
        await files_here.wait()

    def find_model(model_id: str) -> ModelInfo:
        return read_model_info(folder, model_id)

    return find_model, prepare


def mlx_mapped(pid: int) -> bool:
    """The process has mlx's native library loaded (it imported mlx.core)."""
    return "libmlx" in Path(f"/proc/{pid}/maps").read_text()


async def test_the_runner_imports_mlx_while_the_files_download_and_loads_when_they_are_here(
    tmp_path: Path,
) -> None:
    files_here = asyncio.Event()
    find_model, prepare = downloading_until(tmp_path, files_here)
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


async def test_a_warm_spare_runner_becomes_the_stage_runner_and_is_replaced_once_the_node_is_idle(
    tmp_path: Path,
) -> None:
    files_here = asyncio.Event()
    find_model, prepare = downloading_until(tmp_path, files_here)
    events: list[Event] = []
    worker = Worker(NODE, find_model, events.extend, prepare=prepare, spare_runner=True)
    await worker.start()
    try:
        await worker.reconcile(State())
        spare = worker._spare  # pyright: ignore[reportPrivateUsage]
        assert spare is not None and spare.process is not None
        spare_pid = spare.process.pid
        await until(lambda: mlx_mapped(spare_pid), "the spare to import mlx")
        await worker.reconcile(placed())
        runner = worker.runners[INSTANCE]
        assert runner.process is not None and runner.process.pid == spare_pid
        await until(lambda: runner.status == "waiting", "the spare to say it started as the stage's runner")
        assert spare.process is None  # no second spare while this stage waits for its files
        await worker.reconcile(placed())
        assert spare.process is None
        spare.idle_seconds = 3600.0
        files_here.set()
        await until(lambda: runner.status == "ready", "the stage to load")
        await worker.reconcile(placed())
        assert spare.process is None  # not before the node has been idle for idle_seconds
        spare.idle_seconds = 0.0
        await worker.reconcile(placed())
        replacement = spare.process
        assert replacement is not None and replacement.pid != spare_pid
    finally:
        await worker.close()
    assert replacement.returncode == 0  # told to stop by the end of its input, not killed


async def test_a_spare_runner_exits_when_its_node_closes_its_input() -> None:
    from exo.inference.runner import runner_command
    from exo.inference.runner_options import SPARE_FLAG

    process = await asyncio.create_subprocess_exec(
        *runner_command("tcp://127.0.0.1:9", "spare"), SPARE_FLAG, stdin=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(process.wait(), 120) == 0


@pytest.mark.parametrize("value", ["2", "maybe"])
def test_a_bad_spare_runner_setting_is_refused(value: str) -> None:
    from exo.node.spare_runner import spare_enabled

    with pytest.raises(ValueError, match="EXO_SPARE_RUNNER must be 1 or 0"):
        spare_enabled({"EXO_SPARE_RUNNER": value})
    assert spare_enabled({}) and not spare_enabled({"EXO_SPARE_RUNNER": "off"})
