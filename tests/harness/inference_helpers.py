"""Helpers for the inference tests: tiny synthetic models, runner subprocesses, mlx-lm references.

`tiny_models()` makes the test models once per process (no conftest.py fixture needed). Runners
are real `python -m exo.inference.runner` processes driven over their control channel, as the
worker drives them.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import pytest
import zmq

from exo.inference.protocol import (
    ControlFromRunner,
    LoadShard,
    RunnerFailed,
    RunnerStarted,
    RunnerStats,
    ShardLoaded,
    Shutdown,
    control_from_runner_decoder,
    encode,
)
from exo.inference.synthetic import SyntheticModelSpec, write_synthetic_model

N_LAYERS = 6
PREFILL_STEP_SIZE = 16  # small, so test prompts are prefilled in several chunks, as mlx-lm would
# proj_scale 6: greedy output varies from step to step, so token-exactness checks mean something
_TINY = SyntheticModelSpec(layers=N_LAYERS, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=512)
TINY_SPECS = {
    "llama": msgspec.structs.replace(_TINY, architecture="llama", seed=1, proj_scale=6.0),
    "qwen2": msgspec.structs.replace(_TINY, architecture="qwen2", seed=2, proj_scale=6.0),
}
SPLITS = {
    1: [(0, 6)],
    2: [(0, 3), (3, 6)],
    3: [(0, 2), (2, 4), (4, 6)],
}
DEADLINE = 90.0  # seconds a control-channel wait may take (runners start slowly on a loaded machine)


@functools.cache
def tiny_models() -> dict[str, Path]:
    """architecture -> folder of a tiny seeded model, made once per test process."""
    root = Path(tempfile.mkdtemp(prefix="exo-inference-models-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return {name: write_synthetic_model(root / f"tiny-{name}", spec) for name, spec in TINY_SPECS.items()}


# The formats users download: a bfloat16 checkpoint, and 4-bit / 8-bit mlx-lm conversions. The 4-bit
# one is made from bfloat16 weights, so its scales, biases and norms are bfloat16 as in Hub
# conversions; the 8-bit one keeps float32 scales and uses another group size.
FORMAT_SPECS = {
    "bf16": msgspec.structs.replace(TINY_SPECS["llama"], dtype="bfloat16"),
    "q4": msgspec.structs.replace(TINY_SPECS["llama"], dtype="bfloat16", quantize_bits=4, group_size=64),
    "q8": msgspec.structs.replace(TINY_SPECS["qwen2"], quantize_bits=8, group_size=32),
}


@functools.cache
def tiny_format_models() -> dict[str, Path]:
    """format name -> folder of a tiny model saved in that format, made once per test process."""
    root = Path(tempfile.mkdtemp(prefix="exo-format-models-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return {name: write_synthetic_model(root / f"tiny-{name}", spec) for name, spec in FORMAT_SPECS.items()}


class ControlServer:
    """The worker's side of the control channel: a ROUTER that runners connect to."""

    def __init__(self) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:*")
        endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes)
        self.address = endpoint.decode()
        self.backlog: list[tuple[str, ControlFromRunner]] = []

    def send(self, runner_id: str, message: msgspec.Struct) -> None:
        self.socket.send_multipart([runner_id.encode(), encode(message)])

    def send_raw(self, runner_id: str, payload: bytes) -> None:
        self.socket.send_multipart([runner_id.encode(), payload])

    def receive(
        self, runner_id: str, kinds: tuple[type, ...], timeout: float = DEADLINE
    ) -> ControlFromRunner:
        """The next message of one of `kinds` from `runner_id`; others from it are skipped."""
        for position, (sender, message) in enumerate(self.backlog):
            if sender == runner_id and isinstance(message, kinds):
                del self.backlog[position]
                return message
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(int(left * 1000)):
                break
            identity, payload = self.socket.recv_multipart()
            message = control_from_runner_decoder.decode(payload)
            sender = identity.decode()
            if sender == runner_id and isinstance(message, kinds):
                return message
            if sender != runner_id:
                self.backlog.append((sender, message))
        raise TimeoutError(f"no {[kind.__name__ for kind in kinds]} from {runner_id} within {timeout} s")

    def discard_stats(self, runner_id: str) -> None:
        """Forget the RunnerStats of `runner_id` received so far, so the next one is fresh."""
        while self.socket.poll(0):
            identity, payload = self.socket.recv_multipart()
            self.backlog.append((identity.decode(), control_from_runner_decoder.decode(payload)))
        self.backlog = [
            (sender, message)
            for sender, message in self.backlog
            if not (sender == runner_id and isinstance(message, RunnerStats))
        ]

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


@dataclass
class RunnerProcess:
    runner_id: str
    process: subprocess.Popen[bytes]
    activation_address: str = ""


def spawn_runner(control: ControlServer, *extra: str) -> RunnerProcess:
    runner_id = f"runner-{uuid.uuid4().hex[:8]}"
    command = [
        sys.executable, "-m", "exo.inference.runner", "--control", control.address, "--runner-id", runner_id,
        "--prefill-step-size", str(PREFILL_STEP_SIZE), "--stats-interval", "0.2", *extra,
    ]  # fmt: skip
    return RunnerProcess(runner_id, subprocess.Popen(command))


def load(
    control: ControlServer,
    runner: RunnerProcess,
    model: Path,
    start: int,
    end: int,
    *,
    n_layers: int = N_LAYERS,
    placed_weights: Literal["float32", "native"] | None = None,
) -> ShardLoaded | RunnerFailed:
    control.receive(runner.runner_id, (RunnerStarted,))
    command = LoadShard(
        instance_id="i-test", model_id=model.name, model_path=str(model), start_layer=start, end_layer=end,
        n_layers=n_layers, placed_weights=placed_weights,
    )  # fmt: skip
    control.send(runner.runner_id, command)
    answer = control.receive(runner.runner_id, (ShardLoaded, RunnerFailed))
    assert isinstance(answer, ShardLoaded | RunnerFailed)
    if isinstance(answer, ShardLoaded):
        runner.activation_address = answer.activation_address
    return answer


def launch_pipeline(control: ControlServer, model: Path, stages: int) -> list[RunnerProcess]:
    """Runners for an even split of `model` into `stages`, loaded, in route order."""
    runners = [spawn_runner(control) for _ in SPLITS[stages]]  # start together: imports overlap
    for runner, (start, end) in zip(runners, SPLITS[stages], strict=True):
        answer = load(control, runner, model, start, end)
        assert isinstance(answer, ShardLoaded), answer
    return runners


def latest_stats(control: ControlServer, runner: RunnerProcess) -> RunnerStats:
    stats = control.receive(runner.runner_id, (RunnerStats,))
    assert isinstance(stats, RunnerStats)
    return stats


def wait_for_stats(
    control: ControlServer, runner: RunnerProcess, condition: str, timeout: float = 10.0
) -> RunnerStats:
    """Poll RunnerStats sent from now on until `condition` (an expression over `stats`) holds."""
    control.discard_stats(runner.runner_id)
    deadline = time.monotonic() + timeout
    while True:
        stats = latest_stats(control, runner)
        if eval(condition, {}, {"stats": stats}):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"{condition} never held; last {stats}")


def stop_runners(control: ControlServer, runners: list[RunnerProcess]) -> None:
    for runner in runners:
        if runner.process.poll() is None:
            control.send(runner.runner_id, Shutdown())
    for runner in runners:
        try:
            runner.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            runner.process.kill()
            runner.process.wait()


@pytest.fixture
def control_server() -> Iterator[ControlServer]:
    server = ControlServer()
    yield server
    server.close()


_REFERENCE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from exo.inference.blas import load_optimized_blas
    load_optimized_blas()  # the runners use the same BLAS, so the same rounding
    import mlx_lm
    request = json.load(sys.stdin)
    model, tokenizer = mlx_lm.load(request["model"])
    answers = []
    for case in request["cases"]:
        tokenizer.eos_token_ids = case["eos"]
        answers.append([
            [response.token, response.finish_reason]
            for response in mlx_lm.stream_generate(
                model, tokenizer, case["prompt"], max_tokens=case["max_tokens"],
                prefill_step_size=request["prefill_step_size"],
            )
        ])
    json.dump(answers, sys.stdout)
    """
)


def mlx_lm_reference(
    model: Path, cases: list[tuple[list[int], int, list[int]]]
) -> list[list[tuple[int, str | None]]]:
    """Greedy (token, finish_reason) sequences from mlx_lm.stream_generate, in a fresh process.

    Each case is (prompt tokens, max_tokens, eos token ids).
    """
    request = {
        "model": str(model),
        "prefill_step_size": PREFILL_STEP_SIZE,
        "cases": [
            {"prompt": prompt, "max_tokens": max_tokens, "eos": eos} for prompt, max_tokens, eos in cases
        ],
    }
    completed = subprocess.run(
        [sys.executable, "-c", _REFERENCE_SCRIPT],
        input=json.dumps(request).encode(),
        capture_output=True,
        check=True,
        timeout=120,
        env={**os.environ},
    )
    return [[(token, finish) for token, finish in answer] for answer in json.loads(completed.stdout)]
