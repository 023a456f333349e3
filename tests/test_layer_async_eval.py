"""A stage starts each layer while Python builds the next one only where the two can run on
different cores: a process pinned to one core (a tensor rank in the benchmarks) skips the
per-layer `async_eval`, whose cost there buys no overlap. Either way the logits are the same."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from exo.inference import shard as shard_module
from exo.inference.shard import ShardSpec, builds_beside_compute, load_shard
from tests.harness.inference_helpers import tiny_models

LAYERS = 6


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_models()["llama"]


@pytest.mark.parametrize(("cores", "expected"), [({0}, False), ({3}, False), ({0, 1}, True)])
def test_the_per_layer_overlap_follows_the_cores_the_process_may_use(
    monkeypatch: pytest.MonkeyPatch, cores: set[int], expected: bool
) -> None:
    monkeypatch.setattr(shard_module.os, "sched_getaffinity", lambda pid: cores, raising=False)
    assert builds_beside_compute() is expected


@pytest.mark.parametrize(("count", "expected"), [(1, False), (4, True), (None, False)])
def test_without_an_affinity_call_the_machine_s_cores_decide(
    monkeypatch: pytest.MonkeyPatch, count: int | None, expected: bool
) -> None:
    monkeypatch.delattr(shard_module.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(shard_module.os, "cpu_count", lambda: count)
    assert builds_beside_compute() is expected


def logits_and_calls(
    model: Path, monkeypatch: pytest.MonkeyPatch, per_layer: bool
) -> tuple[list[float], int]:
    """A prompt's then one decode step's logits, and how many async_evals the passes made."""
    shard = load_shard(model, ShardSpec(0, LAYERS, LAYERS))
    shard.layer_async_eval = per_layer
    calls = 0
    real_async_eval = mx.async_eval

    def counted(*arrays: object) -> None:
        nonlocal calls
        calls += 1
        real_async_eval(*arrays)

    monkeypatch.setattr(shard_module.mx, "async_eval", counted)
    cache = shard.make_cache()
    prompt = shard.forward(mx.array([[1, 5, 9, 2]]), cache)
    step = shard.forward(mx.array([[7]]), cache)
    mx.eval(prompt, step)
    monkeypatch.setattr(shard_module.mx, "async_eval", real_async_eval)
    values = mx.concatenate([prompt.reshape(-1), step.reshape(-1)]).tolist()
    assert isinstance(values, list)
    return [float(value) for value in values], calls  # pyright: ignore[reportArgumentType]


def test_skipping_the_per_layer_evaluation_leaves_the_logits_bit_identical(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlapped, calls = logits_and_calls(model, monkeypatch, per_layer=True)
    alone, no_calls = logits_and_calls(model, monkeypatch, per_layer=False)
    assert calls == 2 * LAYERS and no_calls == 0
    assert alone == overlapped
