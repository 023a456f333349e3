"""Greedy decoding checks shared by the exactness tests of checkpoint formats and exo's kernel: a
pipeline of shards and mlx-lm's own model, stepped token by token on the same prompts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache

from exo.inference.shard import ShardModel, ShardSpec, load_shard
from tests.harness.inference_helpers import N_LAYERS, SPLITS

PROMPTS = [[3, 50, 70, 90, 11], [200, 17], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
GREEDY_TOKENS = 16
LOGITS_TOLERANCE = 1e-3  # of the largest |logit| at that step


def argmax(logits: mx.array) -> int:
    value = mx.argmax(logits).item()
    assert isinstance(value, int)
    return value


def largest(values: mx.array) -> float:
    value = mx.abs(values).max().item()
    assert isinstance(value, float)
    return value


def module_class(root: Any, path: str) -> str:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return type(root).__name__


def stages_of(model: Path, stages: int, representation: Any = "float32") -> list[ShardModel]:
    return [
        load_shard(model, ShardSpec(start_layer=start, end_layer=end, n_layers=N_LAYERS), representation)
        for start, end in SPLITS[stages]
    ]


def pipeline_greedy(shards: list[ShardModel], prompt: list[int]) -> tuple[list[int], list[mx.array]]:
    caches = [shard.make_cache() for shard in shards]
    inputs = mx.array([prompt])
    tokens: list[int] = []
    logits: list[mx.array] = []
    for _ in range(GREEDY_TOKENS):
        hidden = inputs
        for shard, cache in zip(shards, caches, strict=True):
            hidden = shard.forward(hidden, cache)
        last = hidden[0, -1]
        logits.append(last)
        tokens.append(argmax(last))
        inputs = mx.array([[tokens[-1]]])
    return tokens, logits


def reference_greedy(model: Any, prompt: list[int]) -> tuple[list[int], list[mx.array]]:
    cache = make_prompt_cache(model)
    inputs = mx.array([prompt])
    tokens: list[int] = []
    logits: list[mx.array] = []
    for _ in range(GREEDY_TOKENS):
        last = model(inputs, cache=cache)[0, -1]
        logits.append(last)
        tokens.append(argmax(last))
        inputs = mx.array([[tokens[-1]]])
    return tokens, logits


def assert_greedy_matches(
    shards: list[ShardModel],
    expected_for: Callable[[list[int]], tuple[list[int], list[mx.array]]],
    tolerance: float,
) -> None:
    """The pipeline's greedy tokens equal `expected_for(prompt)`'s on every test prompt and each
    step's logits are within `tolerance` of the largest expected logit; the expected tokens must
    vary, or equality would mean little."""
    for prompt in PROMPTS:
        expected_tokens, expected_logits = expected_for(prompt)
        tokens, logits = pipeline_greedy(shards, prompt)
        assert len(set(expected_tokens)) > 3, "greedy output should vary for the test to mean much"
        assert tokens == expected_tokens
        for got, expected in zip(logits, expected_logits, strict=True):
            assert largest(got - expected) <= tolerance * largest(expected)


def upcast_reference(model: Path) -> Any:
    """mlx-lm's own model of the checkpoint, with every floating array widened to float32."""
    loaded: Any = mlx_lm.load(str(model))[0]
    loaded.set_dtype(mx.float32)
    return loaded
