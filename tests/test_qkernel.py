"""exo's CPU kernel for mlx-lm's quantized weights (exo/inference/qkernel.py, kernels/qgemv.cpp).

Numerics: the kernel computes s*(q.x) + b*sum(x) per group in float32, where the reference
(mx.dequantize to float32, then a float32 matmul) rounds s*q + b per weight first; both are float32
sums in different orders, so the product is checked within PRODUCT_TOLERANCE of the largest
|output| (measured: 1e-6 to 6e-6). Pipelines of kernel layers give mlx-lm's greedy tokens (its
quantized model with scales widened to float32) for every prompt of test_weights_dtype's set, 16
tokens each, in 1, 2 and 3 stages, logits within LOGITS_TOLERANCE of the largest logit (measured 6e-6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

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

PRODUCT_TOLERANCE = 2e-5
LOGITS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def kernel() -> Any:
    return qkernel.load_kernel(required=True)


def quantized(out: int, inputs: int, *, group_size: int, bits: int, dtype: mx.Dtype) -> tuple[mx.array, ...]:
    mx.random.seed(out * inputs + bits)
    weights = mx.random.normal((out, inputs)) * 0.05
    packed, scales, biases = mx.quantize(weights, group_size, bits)
    return packed, scales.astype(dtype), biases.astype(dtype)


def reference(x: mx.array, layer: tuple[mx.array, ...], *, group_size: int, bits: int) -> mx.array:
    packed, scales, biases = layer
    wide = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits)
    return x @ wide.T


def relative_error(got: mx.array, expected: mx.array) -> float:
    return largest(got - expected) / largest(expected)


LAYOUTS = [(bits, group_size) for bits in (4, 8) for group_size in (32, 64, 128)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{bits}bit-g{group}" for bits, group in LAYOUTS])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("isa", ["native", "scalar"])
def test_product_equals_dequantized_matmul(
    kernel: Any, layout: tuple[int, int], dtype: mx.Dtype, isa: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bits, group_size = layout
    if isa == "scalar":
        monkeypatch.setenv("EXO_KERNEL_ISA", "scalar")  # read on every call: the portable path
    assert kernel.isa() == ("scalar" if isa == "scalar" else "avx2")
    # An odd number of outputs and an input size of 3 blocks of 128: nothing is a power of two.
    packed, scales, biases = quantized(37, 384, group_size=group_size, bits=bits, dtype=dtype)
    for rows in (1, 3, 8, 13):  # 13 rows: a chunk of 8 and one of 5
        x = mx.random.normal((rows, 384))
        got = qkernel.quantized_gemv(x, packed, scales, biases, group_size=group_size, bits=bits)
        assert got.dtype == mx.float32 and got.shape == (rows, 37)
        assert (
            relative_error(got, reference(x, (packed, scales, biases), group_size=group_size, bits=bits))
            < PRODUCT_TOLERANCE
        )


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{bits}bit-g{group}" for bits, group in LAYOUTS])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=["f32", "bf16", "f16"])
def test_dequantize_equals_mlx_dequantize_bit_for_bit(
    kernel: Any, layout: tuple[int, int], dtype: mx.Dtype
) -> None:
    bits, group_size = layout
    packed, scales, biases = quantized(37, 384, group_size=group_size, bits=bits, dtype=dtype)
    got = qkernel.dequantize_f32(packed, scales, biases, group_size=group_size, bits=bits)
    expected = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits)
    assert got.dtype == mx.float32 and mx.array_equal(got, expected).item()
    with pytest.raises(ValueError, match="dequantize: bits must be 4 or 8"):
        kernel.dequantize(packed, scales, biases, group_size, 2)


def test_kernel_linear_takes_the_dequantized_route_for_prompt_chunks(kernel: Any) -> None:
    from mlx import nn

    layer = nn.QuantizedLinear(256, 48, bias=True, group_size=64, bits=4)
    layer.update({"bias": mx.random.normal((48,))})
    fast = qkernel.kernel_linear_class()(layer)
    for rows in (1, qkernel.KERNEL_MAX_ROWS, qkernel.KERNEL_MAX_ROWS + 1, 200):
        x = mx.random.normal((1, rows, 256))
        assert relative_error(fast(x), layer(x)) < PRODUCT_TOLERANCE


def test_leading_dimensions_and_strided_inputs(kernel: Any) -> None:
    packed, scales, biases = quantized(40, 256, group_size=64, bits=4, dtype=mx.bfloat16)
    x = mx.random.normal((2, 3, 256))
    got = qkernel.quantized_gemv(x, packed, scales, biases, group_size=64, bits=4)
    assert got.shape == (2, 3, 40)
    assert (
        relative_error(got, reference(x, (packed, scales, biases), group_size=64, bits=4)) < PRODUCT_TOLERANCE
    )
    strided = mx.random.normal((256, 5)).T  # column-major view: the primitive makes it contiguous
    got = qkernel.quantized_gemv(strided, packed, scales, biases, group_size=64, bits=4)
    assert (
        relative_error(got, reference(strided, (packed, scales, biases), group_size=64, bits=4))
        < PRODUCT_TOLERANCE
    )


def test_bad_inputs_are_refused_with_a_reason(kernel: Any) -> None:
    packed, scales, biases = quantized(16, 128, group_size=64, bits=4, dtype=mx.float32)
    x = mx.random.normal((1, 128))
    cases = [
        ((x, packed, scales, biases, 64, 3), "bits must be 4 or 8"),
        ((x, packed, scales, biases, 16, 4), "group_size must be 32, 64 or 128"),
        ((x.astype(mx.bfloat16), packed, scales, biases, 64, 4), "x must be float32"),
        ((mx.random.normal((1, 64)), packed, scales, biases, 64, 4), "x has 64 inputs, the weight 128"),
        ((x, packed.astype(mx.int32), scales, biases, 64, 4), "w must be a 2-D uint32 array"),
        ((x, packed, scales, biases.astype(mx.float16), 64, 4), "biases must have the scales' dtype"),
        ((x, packed, scales[:, :1], biases[:, :1], 64, 4), "scales have shape (16, 1), expected (16, 2)"),
        ((x, packed, scales.astype(mx.int32), biases.astype(mx.int32), 64, 4), "scales must be float32"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            kernel.quantized_gemv(*args)
    # An input size the 8-word blocks do not tile (4-bit: multiples of 64) is refused, and such a
    # layer is left to the dequantized path (kernel_supports).
    odd_packed, odd_scales, odd_biases = quantized(8, 96, group_size=32, bits=4, dtype=mx.float32)
    with pytest.raises(ValueError, match="multiple of 64"):
        kernel.quantized_gemv(mx.random.normal((1, 96)), odd_packed, odd_scales, odd_biases, 32, 4)
    assert not qkernel.kernel_supports(4, 32, "affine", 96)
    assert qkernel.kernel_supports(4, 32, "affine", 128)
    assert not qkernel.kernel_supports(4, 64, "mxfp4", 128)
    assert not qkernel.kernel_supports(2, 64, "affine", 128)


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("checkpoint", ["q4", "q8"])
def test_kernel_pipeline_gives_mlx_lm_quantized_greedy_tokens(
    kernel: Any, checkpoint: str, stages: int
) -> None:
    model = tiny_format_models()[checkpoint]
    expected_model = upcast_reference(model)
    shards = stages_of(model, stages)
    assert module_class(shards[0].layers[0], "mlp.down_proj") == "KernelLinear"
    assert module_class(shards[0].layers[0], "self_attn.q_proj.fused") == "KernelLinear"  # with k, v
    assert_greedy_matches(shards, lambda prompt: reference_greedy(expected_model, prompt), LOGITS_TOLERANCE)


def test_kernel_stage_holds_the_packed_bytes(kernel: Any) -> None:
    model = tiny_format_models()["q4"]
    spec = ShardSpec(start_layer=1, end_layer=3, n_layers=N_LAYERS)
    native = load_shard(model, spec, "native")
    packed = load_shard(model, spec, "float32")
    assert packed.weight_bytes < 1.3 * native.weight_bytes  # not the ~6x of dequantized float32


def test_disabled_kernel_keeps_the_dequantized_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXO_KERNEL", "off")
    assert qkernel.load_kernel() is None
    assert not qkernel.kernel_expected()
    with pytest.raises(qkernel.KernelBuildError, match="EXO_KERNEL=off"):
        qkernel.load_kernel(required=True)
    shards = stages_of(tiny_format_models()["q4"], 1)
    assert module_class(shards[0].layers[0], "mlp.down_proj") == "Linear"


def test_build_without_a_toolchain_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(qkernel.KernelBuildError, match="needs cmake and a C\\+\\+ compiler"):
        qkernel.build(tmp_path / "out")


def test_building_ahead_reports_the_module_or_why_not(
    kernel: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert qkernel.main() == 0
    assert "(avx2)" in capsys.readouterr().out
    monkeypatch.setenv("EXO_KERNEL", "off")
    assert qkernel.main() == 1
    assert "not available: disabled by EXO_KERNEL=off" in capsys.readouterr().out


def test_models_without_quantized_layers_never_ask_for_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # With its float32 product switched off (it is on by default: tests/test_qkernel_float.py).
    monkeypatch.setenv("EXO_KERNEL_FLOAT", "off")

    def refuse(**_: object) -> None:
        raise AssertionError("the kernel was asked for")

    monkeypatch.setattr(qkernel, "load_kernel", refuse)
    shards = stages_of(tiny_format_models()["bf16"], 1)
    assert module_class(shards[0].layers[0], "mlp.down_proj") == "Linear"


def test_a_module_that_takes_no_mlx_arrays_or_computes_wrong_is_refused(kernel: Any) -> None:
    class OtherAbi:
        def quantized_gemv(self, *_: object) -> mx.array:
            raise TypeError("incompatible function arguments")

    class Wrong:
        def quantized_gemv(self, x: mx.array, packed: mx.array, *_: object) -> mx.array:
            return mx.zeros((x.shape[0], packed.shape[0]))

    with pytest.raises(qkernel.KernelBuildError, match="does not take this mlx's arrays"):
        qkernel._self_check(OtherAbi())
    with pytest.raises(qkernel.KernelBuildError, match="self-check product is wrong"):
        qkernel._self_check(Wrong())
    qkernel._self_check(kernel)


@pytest.fixture
def fresh_expectation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """kernel_expected() on an AVX2 x86_64 host with an empty cache dir, its memo cleared."""
    monkeypatch.delenv("EXO_KERNEL", raising=False)
    monkeypatch.setenv("EXO_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(qkernel.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(qkernel, "_cpu_has_avx2", lambda: True)
    qkernel._toolchain_or_build.cache_clear()  # pyright: ignore[reportPrivateUsage]
    yield tmp_path / "kernels"
    qkernel._toolchain_or_build.cache_clear()  # pyright: ignore[reportPrivateUsage]


def test_kernel_expectation_looks_up_the_toolchain_once(
    fresh_expectation: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []

    def which(name: str) -> str | None:
        lookups.append(name)
        return f"/usr/bin/{name}"

    monkeypatch.setattr(qkernel.shutil, "which", which)
    assert all(qkernel.kernel_expected() for _ in range(5))
    assert lookups == ["cmake", "c++"]  # placement asks per footprint; PATH is searched once


def test_kernel_expectation_without_a_toolchain_needs_a_cached_build(
    fresh_expectation: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qkernel.shutil, "which", lambda _name: None)
    assert not qkernel.kernel_expected()
    built = fresh_expectation / "key" / f"{qkernel.MODULE_NAME}.so"
    built.parent.mkdir(parents=True)
    built.touch()
    assert not qkernel.kernel_expected()  # the memo holds within a process
    qkernel._toolchain_or_build.cache_clear()  # pyright: ignore[reportPrivateUsage]
    assert qkernel.kernel_expected()
    monkeypatch.setenv("EXO_KERNEL", "off")
    assert not qkernel.kernel_expected()  # the switch is still read on every call
