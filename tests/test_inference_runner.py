"""The runner subprocess on bad input: models it cannot load, and frames that are not protocol."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import msgspec
import pytest
import zmq

from exo.inference.client import GenerationRequest, PipelineClient, TokenSink
from exo.inference.protocol import (
    ActivationsSent,
    GenerationCancelled,
    GenerationFailed,
    LoadShard,
    RunnerFailed,
    ShardLoaded,
    TokenSampled,
    encode,
)
from tests.harness.inference_helpers import (
    N_LAYERS,
    ControlServer,
    load,
    spawn_runner,
    stop_runners,
    tiny_models,
    wait_for_stats,
)

pytestmark = pytest.mark.slow


def unsupported_copy(model: Path, destination: Path) -> Path:
    shutil.copytree(model, destination)
    config = json.loads((destination / "config.json").read_text())
    config["model_type"] = "gpt2"
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize(
    ("case", "expected_reason"),
    [
        ("missing", "no model at"),
        ("unsupported", "architecture 'gpt2' is not supported"),
        ("bad-range", "invalid layer range"),
    ],
)
def test_runner_that_cannot_load_says_why_and_exits(tmp_path: Path, case: str, expected_reason: str) -> None:
    model = tiny_models()["llama"]
    start, end = 0, N_LAYERS
    if case == "missing":
        model = tmp_path / "no-such-model"
    elif case == "unsupported":
        model = unsupported_copy(model, tmp_path / "gpt2-model")
    else:
        start, end = 4, 2
    control = ControlServer()
    runner = spawn_runner(control)
    try:
        answer = load(control, runner, model, start, end)
        assert isinstance(answer, RunnerFailed)
        assert expected_reason in answer.reason
        assert answer.instance_id == "i-test"
        assert runner.process.wait(timeout=10) == 1
    finally:
        stop_runners(control, [runner])
        control.close()


def garbage_frames() -> list[list[bytes]]:
    """Frames a runner's activation socket must drop (and count) without crashing."""
    activations = ActivationsSent(request_id="r", step=0, shape=[1, 1, 128], dtype="float32")
    bad_start = {
        "type": "GenerationStarted",
        "request_id": "r",
        "route": ["x"],
        "reply_to": "y",
        "prompt_tokens": ["a"],
        "max_tokens": 1,
        "eos_token_ids": [],
    }
    return [
        [b"\xc1 not msgpack"],
        [msgspec.msgpack.encode({"type": "Nope", "request_id": "r"})],
        [encode(GenerationCancelled(request_id="r")), b"", b""],  # three frames
        [encode(activations)],  # activations without their buffer
        [encode(GenerationCancelled(request_id="r")), b"\x00" * 8],  # a buffer where none belongs
        [encode(activations), b"\x00" * 512],  # activations sent to a first stage
        [msgspec.msgpack.encode(bad_start)],  # prompt tokens that are not ints
        [encode(GenerationFailed(request_id="r", reason="addressed to a requester, not a stage"))],
    ]


async def test_malformed_frames_are_dropped_and_counted() -> None:
    model = tiny_models()["llama"]
    control = ControlServer()
    runner = spawn_runner(control)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        answer = load(control, runner, model, 0, N_LAYERS)
        assert isinstance(answer, ShardLoaded)
        # a second LoadShard and control garbage: dropped too, the runner keeps its shard
        second = LoadShard(
            instance_id="i-2",
            model_id="m",
            model_path=str(model),
            start_layer=0,
            end_layer=1,
            n_layers=N_LAYERS,
        )
        control.send(runner.runner_id, second)
        control.send_raw(runner.runner_id, b"\x92\x01")
        push.connect(answer.activation_address)
        frames = garbage_frames()
        for message in frames:
            push.send_multipart(message)
        push.send(encode(TokenSampled(request_id="unknown", step=0, token=1)))  # stale, not malformed
        stats = wait_for_stats(control, runner, f"stats.dropped_frames == {len(frames) + 2}")
        assert stats.stale_frames == 1

        sink = TokenSink()
        await sink.start()
        client = PipelineClient(sink)
        try:
            async with contextlib.aclosing(
                client.generate([answer.activation_address], GenerationRequest([5, 6, 7], 4, []))
            ) as tokens:
                got = [sampled async for sampled in tokens]
        finally:
            await client.close()
            await sink.close()
        assert [sampled.step for sampled in got] == [0, 1, 2, 3]
        assert got[-1].finish_reason == "length"
        assert runner.process.poll() is None
    finally:
        push.close()
        context.term()
        stop_runners(control, [runner])
        control.close()
    assert runner.process.returncode == 0  # Shutdown is a clean exit
