"""exo's kernel for float32 linear layers (kernels/sgemv.h) and its thread pool (kernels/pool.h).

Numerics: the same float32 products as MLX's matmul summed in another order (8-lane partial sums),
so the product is checked within PRODUCT_TOLERANCE of the largest |output| (measured ~4e-7), and
pipelines of float32 stages give mlx-lm's greedy tokens with logits within LOGITS_TOLERANCE.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx import nn

from exo.inference import qkernel
from exo.inference.shard import ShardSpec, load_shard
from tests.harness.greedy_checks import (
    assert_greedy_matches,
    largest,
    module_class,
    reference_greedy,
    stages_of,
    upcast_reference,
)
from tests.harness.inference_helpers import N_LAYERS, tiny_format_models

PRODUCT_TOLERANCE = 1e-5
LOGITS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def kernel() -> Any:
    return qkernel.load_kernel(required=True)


def relative_error(got: mx.array, expected: mx.array) -> float:
    return largest(got - expected) / largest(expected)


# Input sizes with and without a tail past the 16-float steps; outputs below, at and above the
# 64 a thread's part takes (1, 63, 300: one part, two uneven parts); rows 1-8 (every unrolled
# case) and 13 (a chunk of 8 and one of 5).
@pytest.mark.parametrize("isa", ["vector", "scalar"])
@pytest.mark.parametrize("inputs", [7, 100, 1024])
@pytest.mark.parametrize("out", [1, 63, 300])
def test_float_product_equals_mlx_matmul(
    kernel: Any, monkeypatch: pytest.MonkeyPatch, isa: str, inputs: int, out: int
) -> None:
    if isa == "scalar":
        monkeypatch.setenv("EXO_KERNEL_ISA", "scalar")
    mx.random.seed(inputs * out)
    w = mx.random.normal((out, inputs))
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 13):
        x = mx.random.normal((rows, inputs))
        got = qkernel.float_gemv(x, w)
        assert got.shape == (rows, out)
        assert relative_error(got, x @ w.T) < PRODUCT_TOLERANCE, (rows, inputs, out)


def test_float_product_takes_leading_dimensions_and_strided_inputs(kernel: Any) -> None:
    w = mx.random.normal((96, 256))
    x = mx.random.normal((2, 3, 256))
    got = qkernel.float_gemv(x, w)
    assert got.shape == (2, 3, 96)
    assert relative_error(got, x @ w.T) < PRODUCT_TOLERANCE
    strided_x = mx.random.normal((256, 5)).T  # column-major views: the primitive makes them contiguous
    strided_w = mx.random.normal((256, 96)).T
    assert (
        relative_error(qkernel.float_gemv(strided_x, strided_w), strided_x @ strided_w.T) < PRODUCT_TOLERANCE
    )


def test_float_product_refuses_bad_inputs_with_a_reason(kernel: Any) -> None:
    w = mx.random.normal((16, 128))
    x = mx.random.normal((1, 128))
    cases = [
        ((x.astype(mx.bfloat16), w), "x and w must be float32"),
        ((x, w.astype(mx.float16)), "x and w must be float32"),
        ((mx.random.normal((1, 64)), w), "x has 64 inputs, the weight 128"),
        ((x, mx.random.normal((128,))), "w must be 2-D, got 1 dimensions"),
        ((mx.zeros((0, 128)), w), "x and w must not be empty"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            kernel.float_gemv(*args)


def test_pool_serves_products_from_several_threads_at_once(kernel: Any) -> None:
    # Products from two Python threads at once: one gets the pool, the other runs its parts
    # itself; every result must still be exact (and nothing may hang).
    w = mx.random.normal((512, 1024))
    mx.eval(w)
    failures: list[str] = []

    def products(seed: int) -> None:
        for step in range(40):
            x = mx.random.normal((1 + step % 4, 1024), key=mx.random.key(seed * 100 + step))
            if relative_error(qkernel.float_gemv(x, w), x @ w.T) >= PRODUCT_TOLERANCE:
                failures.append(f"thread {seed} step {step}")

    threads = [threading.Thread(target=products, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []


@pytest.mark.parametrize("bias", [False, True])
def test_float_linear_uses_the_kernel_for_decode_and_mlx_for_prompts(kernel: Any, bias: bool) -> None:
    layer = nn.Linear(256, 80, bias=bias)
    fast = qkernel.float_linear_class()(layer)
    for rows in (1, qkernel.FLOAT_KERNEL_MAX_ROWS, qkernel.FLOAT_KERNEL_MAX_ROWS + 1, 200):
        x = mx.random.normal((1, rows, 256))
        assert relative_error(fast(x), layer(x)) < PRODUCT_TOLERANCE
    # Another dtype (a caller's bfloat16 activations) takes MLX's matmul, as nn.Linear would.
    x = mx.random.normal((1, 256)).astype(mx.bfloat16)
    assert fast(x).dtype == layer(x).dtype


def test_float32_stages_hold_kernel_linears_unless_switched_off(
    kernel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_format_models()["bf16"]
    shards = stages_of(model, 1)
    # q/k/v and gate/up are fused (exo.inference.fuse): the fused product keeps the kernel's kind
    assert module_class(shards[0].layers[0], "mlp.down_proj") == "FloatKernelLinear"
    assert module_class(shards[0].layers[0], "self_attn.q_proj.fused") == "FloatKernelLinear"
    monkeypatch.setenv("EXO_KERNEL_FLOAT", "off")
    assert module_class(stages_of(model, 1)[0].layers[0], "mlp.down_proj") == "Linear"
    monkeypatch.delenv("EXO_KERNEL_FLOAT")
    monkeypatch.setenv("EXO_KERNEL", "off")
    assert module_class(stages_of(model, 1)[0].layers[0], "mlp.down_proj") == "Linear"


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_float_kernel_pipeline_gives_mlx_lm_greedy_tokens(kernel: Any, stages: int) -> None:
    # The bfloat16 checkpoint held as float32 with the kernel's product against mlx-lm's model on
    # the same float32 weights: greedy tokens equal, logits within LOGITS_TOLERANCE of the largest.
    model = tiny_format_models()["bf16"]
    reference = upcast_reference(model)
    shards = stages_of(model, stages)
    assert module_class(shards[0].layers[0], "mlp.down_proj") == "FloatKernelLinear"
    assert_greedy_matches(shards, lambda prompt: reference_greedy(reference, prompt), LOGITS_TOLERANCE)


def test_a_tensor_rank_computes_its_sharded_products_with_the_kernel(kernel: Any) -> None:
    # mlx's sharded linears (model.shard) go through the kernel's product too; a group of one
    # (mx.distributed.init() without a hostfile) runs the same layers, its all_sum the identity,
    # so greedy tokens equal mlx-lm's on the same float32 weights (two ranks against mlx-lm's own
    # tensor-parallel run: tests/test_tensor_ranks.py).
    model = tiny_format_models()["bf16"]
    spec = ShardSpec(start_layer=0, end_layer=N_LAYERS, n_layers=N_LAYERS)
    shard = load_shard(model, spec, "float32", group=mx.distributed.init())
    assert module_class(shard.layers[0], "self_attn.q_proj") == "FloatKernelLinear"
    assert module_class(shard.layers[0], "mlp.down_proj") == "FloatKernelShardedToAll"
    reference = upcast_reference(model)
    assert_greedy_matches([shard], lambda prompt: reference_greedy(reference, prompt), LOGITS_TOLERANCE)


def test_tensor_ranks_keep_mlx_sharded_linears_when_the_float_kernel_is_off(
    kernel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXO_KERNEL_FLOAT", "off")
    spec = ShardSpec(start_layer=0, end_layer=N_LAYERS, n_layers=N_LAYERS)
    shard = load_shard(tiny_format_models()["bf16"], spec, "float32", group=mx.distributed.init())
    assert module_class(shard.layers[0], "self_attn.q_proj") == "AllToShardedLinear"
    assert module_class(shard.layers[0], "mlp.down_proj") == "ShardedToAllLinear"


def test_a_float32_stage_never_waits_for_a_first_kernel_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh machine (no kernel built in the cache): a float32 stage loads at once with MKL's
    # products and one background build starts, once per process; nothing is built on the load path.
    monkeypatch.setattr(qkernel, "_state", qkernel._State())  # pyright: ignore[reportPrivateUsage]
    monkeypatch.setenv("EXO_KERNEL_CACHE", str(tmp_path))
    started: list[bool] = []
    monkeypatch.setattr(qkernel, "_build_in_background", lambda: started.append(True))
    model = tiny_format_models()["bf16"]
    assert module_class(stages_of(model, 1)[0].layers[0], "mlp.down_proj") == "Linear"
    assert module_class(stages_of(model, 2)[1].layers[0], "mlp.down_proj") == "Linear"
    assert started == [True]
    assert list(tmp_path.iterdir()) == []


POOL_SCRIPT = """
import mlx.core as mx
from exo.inference import qkernel
w = mx.random.normal((512, 1024))
for step in range(100):
    x = mx.random.normal((1 + step % 3, 1024))
    got, expected = qkernel.float_gemv(x, w), x @ w.T
    assert (mx.abs(got - expected).max() / mx.abs(expected).max()).item() < 1e-5, step
print("ok")
"""


@pytest.mark.parametrize("spin_us", ["0", "100000"])
def test_pool_workers_that_sleep_or_spin_are_woken_for_every_product(kernel: Any, spin_us: str) -> None:
    # A fresh process with a 2-thread pool: workers that sleep on the futex after every product
    # (spin 0) must be woken for the next one, and spinning ones must see it; a lost wake-up
    # hangs (the timeout fails the test).
    environment = {**os.environ, "EXO_KERNEL_THREADS": "2", "EXO_KERNEL_SPIN_US": spin_us}
    done = subprocess.run(
        [sys.executable, "-c", POOL_SCRIPT],
        check=False,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
