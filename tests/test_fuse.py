"""Fused q/k/v and gate/up products (exo/inference/fuse.py).

Exactness: every fused output column is the same dot product as unfused, so a fused pipeline is
checked against the same checkpoint loaded with EXO_FUSE=off: greedy tokens equal and logits within
FUSED_TOLERANCE of the largest logit (measured: bit-identical, 0.0, for MKL's float32 products, the
kernel and MLX's quantized_matmul on the test machine; the tolerance leaves room for a BLAS that
blocks a wider product differently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from exo.inference import qkernel
from exo.inference.fuse import FusedLinear, FusedSlice, fuse_layers, fused_sum
from exo.inference.shard import ShardSpec, load_shard
from tests.harness.greedy_checks import (
    assert_greedy_matches,
    largest,
    module_class,
    pipeline_greedy,
    stages_of,
)
from tests.harness.inference_helpers import N_LAYERS, tiny_format_models, tiny_models

FUSED_TOLERANCE = 1e-5


def checkpoint(name: str) -> Path:
    return {**tiny_models(), **tiny_format_models()}[name]


CASES = [
    ("llama", "float32"),
    ("qwen2", "float32"),  # q/k/v with biases
    ("q4", "float32"),  # exo's kernel (or the dequantized path where it does not build)
    ("q8", "float32"),
    ("q4", "native"),  # mlx's QuantizedLinear
    ("bf16", "native"),
]


@pytest.mark.parametrize(("name", "representation"), CASES)
@pytest.mark.parametrize("stages", [1, 2])
def test_fused_pipeline_gives_the_unfused_greedy_tokens(
    name: str, representation: str, stages: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = checkpoint(name)
    monkeypatch.setenv("EXO_FUSE", "off")
    unfused = stages_of(model, stages, representation)
    monkeypatch.delenv("EXO_FUSE")
    fused = stages_of(model, stages, representation)
    assert [fused_sum(shard.layers) for shard in fused] == [2 * len(shard.layers) for shard in fused]
    assert sum(fused_sum(shard.layers) for shard in unfused) == 0
    assert [shard.weight_bytes for shard in fused] == [shard.weight_bytes for shard in unfused]
    assert_greedy_matches(fused, lambda prompt: pipeline_greedy(unfused, prompt), FUSED_TOLERANCE)


def test_fused_layer_keeps_the_original_kind() -> None:
    shard = stages_of(checkpoint("q4"), 1)[0]
    kernel = qkernel.load_kernel() is not None
    expected = "KernelLinear" if kernel else "Linear"
    assert module_class(shard.layers[0], "self_attn.q_proj.fused") == expected
    assert module_class(shard.layers[0], "mlp.gate_proj.fused") == expected
    assert module_class(shard.layers[0], "self_attn.v_proj") == "FusedSlice"
    assert module_class(shard.layers[0], "mlp.up_proj") == "FusedSlice"


def test_a_float32_stage_fuses_its_kernel_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 stage's linears decode through the kernel's float32 product where it builds; fusing
    must keep that kind (a plain nn.Linear would put MKL's one-core product back)."""
    monkeypatch.setenv("EXO_KERNEL_FLOAT", "on")
    kernel = qkernel.load_kernel() is not None  # built first: a float32 load never waits for it
    shard = stages_of(checkpoint("llama"), 1)[0]
    expected = "FloatKernelLinear" if kernel else "Linear"
    assert module_class(shard.layers[0], "self_attn.q_proj.fused") == expected
    assert module_class(shard.layers[0], "mlp.gate_proj.fused") == expected


def test_a_slice_called_on_another_input_computes_its_own_product() -> None:
    mx.random.seed(3)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(8, 4)
    wanted = [parent.q_proj, parent.k_proj, parent.v_proj]
    layer = nn.Module()
    layer.self_attn = parent
    assert fuse_layers([layer]) == 1
    assert isinstance(parent.q_proj, FusedLinear) and isinstance(parent.k_proj, FusedSlice)
    first, other = mx.random.normal((1, 2, 8)), mx.random.normal((1, 2, 8))
    for module, reference in zip([parent.q_proj, parent.k_proj, parent.v_proj], wanted, strict=True):
        assert mx.allclose(module(first), reference(first)).item()  # the shared product
    parent.q_proj(first)
    # Out of order, on another input, twice: each computes (and is) its own projection.
    for _ in range(2):
        assert mx.allclose(parent.v_proj(other), wanted[2](other)).item()
        assert mx.allclose(parent.k_proj(other), wanted[1](other)).item()
    assert parent.q_proj.shared.last is not None and parent.q_proj.shared.last[0] is first
    parent.k_proj(first)
    parent.v_proj(first)
    assert parent.q_proj.shared.last is None  # the last slice lets go of the input


def test_projections_of_different_kinds_are_left_alone() -> None:
    parent = nn.Module()
    parent.gate_proj = nn.Linear(64, 32)
    parent.up_proj = nn.QuantizedLinear(64, 32, group_size=64, bits=4)
    layer = nn.Module()
    layer.mlp = parent
    assert fuse_layers([layer]) == 0
    assert type(parent.gate_proj) is nn.Linear
    parent.up_proj = nn.Linear(64, 32, bias=False)  # one with a bias, one without
    assert fuse_layers([layer]) == 0
    parent.gate_proj = nn.QuantizedLinear(64, 32, group_size=32, bits=4)
    parent.up_proj = nn.QuantizedLinear(64, 32, group_size=64, bits=4)  # other quantization
    assert fuse_layers([layer]) == 0


def test_only_the_stage_layers_are_fused() -> None:
    spec = ShardSpec(start_layer=1, end_layer=3, n_layers=N_LAYERS)
    shard = load_shard(checkpoint("llama"), spec, "float32")
    assert fused_sum(shard.layers) == 2 * 2


def test_a_tensor_rank_is_not_fused() -> None:
    spec = ShardSpec(start_layer=0, end_layer=N_LAYERS, n_layers=N_LAYERS)
    shard = load_shard(checkpoint("llama"), spec, "float32", group=mx.distributed.init())
    assert fused_sum(shard.layers) == 0


def test_fusion_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXO_FUSE", "off")
    layers: list[Any] = stages_of(checkpoint("llama"), 1)[0].layers
    assert fused_sum(layers) == 0
    assert module_class(layers[0], "self_attn.q_proj") in {"Linear", "FloatKernelLinear"}


@pytest.mark.parametrize("architecture", ["qwen3"])  # mistral is llama's model in mlx-lm
def test_other_supported_families_compute_the_same_logits(architecture: str) -> None:
    """qwen3 (q/k norms after the products), which the synthetic writer does not make: mlx-lm's
    own model with random weights, before and after fusing its layers."""
    import importlib

    family = importlib.import_module(f"mlx_lm.models.{architecture}")
    mx.random.seed(5)
    args = family.ModelArgs.from_dict(
        {
            "model_type": architecture,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "vocab_size": 50,
            "max_position_embeddings": 128,
            "tie_word_embeddings": False,
            "rope_theta": 10000.0,
        }
    )
    model = family.Model(args)
    inputs = mx.array([[1, 7, 3, 9, 4]])
    expected = model(inputs)
    assert fuse_layers(model.model.layers) == 4
    assert largest(model(inputs) - expected) <= FUSED_TOLERANCE * largest(expected)


@pytest.mark.parametrize("name", ["llama", "q4"])
def test_fusing_keeps_the_load_peak(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each group's source arrays are freed once concatenated: the load's peak grows by at most one
    group's bytes (it grew by all of them while the checkpoint's dict outlived the load)."""
    spec = ShardSpec(start_layer=0, end_layer=N_LAYERS, n_layers=N_LAYERS)
    peaks: dict[str, int] = {}
    for fuse in ("off", "on"):
        monkeypatch.setenv("EXO_FUSE", fuse)
        mx.clear_cache()
        mx.reset_peak_memory()
        shard = load_shard(checkpoint(name), spec, "float32")
        peaks[fuse] = mx.get_peak_memory()
        del shard
    layer: Any = stages_of(checkpoint(name), 1)[0].layers[0]
    largest_group = max(_bytes(layer[part]) for part in ("self_attn", "mlp"))
    assert peaks["on"] <= peaks["off"] + largest_group


def _bytes(module: Any) -> int:
    arrays = tree_flatten(module.parameters())
    assert isinstance(arrays, list)
    return sum(array.nbytes for _, array in arrays)
