"""Which representation a stage holds its weights in, and the load-time conversion to float32.

MLX's CPU backend has fast float32 matrix products (through MKL) and nothing fast for bfloat16,
float16 or packed (quantized) weights: on a 2-core x86_64 machine a bfloat16 model decodes at a
quarter of the same weights in float32, and an mlx-lm 4-bit model with bfloat16 scales at a
thirtieth. So on the CPU backend a runner holds half-precision weights as float32 and dequantizes
mlx-lm's affine-quantized layers to float32 `nn.Linear` / `nn.Embedding` at load; on Metal or CUDA
it keeps the checkpoint's representation.

`--weights-dtype auto|float32|native` (node and runner flag): `auto` upcasts on the CPU backend
unless placement found too little memory for float32 (then the instance says it kept the native
representation); `float32` always upcasts; `native` never does.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import TYPE_CHECKING

from exo.core.models import WEIGHTS_DTYPES, Representation, WeightsDtype, representation_for

if TYPE_CHECKING:
    from mlx import nn

__all__ = ["WEIGHTS_DTYPES", "Representation", "WeightsDtype", "accelerator_backend", "hold_as_float32"]


def accelerator_backend() -> bool:
    """Whether MLX runs on a GPU here (Metal on Apple silicon, or the mlx-cuda package), decided
    without importing mlx: the node must not import it before choosing the BLAS."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return True
    try:
        importlib.metadata.distribution("mlx-cuda")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def wanted_representation(
    weights_dtype: WeightsDtype, *, placed: Representation | None = None, accelerator: bool | None = None
) -> Representation:
    """exo.core.models.representation_for, on this machine's backend unless `accelerator` is given."""
    on_accelerator = accelerator_backend() if accelerator is None else accelerator
    return representation_for(weights_dtype, placed=placed, accelerator=on_accelerator)


def hold_as_float32(model: nn.Module, *, kernel: bool | None = None) -> nn.Module:
    """Dequantize mlx-lm's quantized layers to float32 `nn.Linear` / `nn.Embedding` and cast every
    other floating parameter to float32, lazily: only the arrays a stage evaluates are computed, so
    the layers of other stages cost nothing.

    With exo's CPU kernel (`kernel`: None uses it where it builds and has its AVX2 path), quantized
    linear layers it supports stay packed and compute in float32 through it (exo.inference.qkernel):
    decode reads ~1/7 of float32's bytes, and float32 linear layers decode through its float32
    product (every core; MKL's few-row GEMV runs on one). Embeddings are still dequantized.

    The same replacement as mlx_lm.utils.dequantize_model, but computed in float32: that one keeps
    the scales' dtype (bfloat16 in Hub conversions) and rounds every weight to it.
    """
    import mlx.core as mx
    from mlx import nn
    from mlx.utils import tree_unflatten

    from exo.inference import qkernel
    from exo.inference.sharded_kernel import sharded_float_linears

    if kernel is None:
        # Quantized linear layers need the kernel (and its first-use build); float32 ones use its
        # float32 product unless EXO_KERNEL_FLOAT=off.
        quantized = any(isinstance(module, nn.QuantizedLinear) for _, module in model.named_modules())
        if quantized:
            loaded = qkernel.load_kernel()
        else:  # the float32 product is a speed-up: never wait for a first build for it
            loaded = qkernel.built_kernel() if qkernel.float_enabled() else None
        kernel = loaded is not None and loaded.isa() != "scalar"
    replaced: list[tuple[str, nn.Module]] = []
    packed: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding):
            continue
        if (
            kernel
            and isinstance(module, nn.QuantizedLinear)
            and module.get("biases") is not None
            and qkernel.kernel_supports(
                module.bits, module.group_size, module.mode, module.weight.shape[1] * 32 // module.bits
            )
        ):
            # Built before set_dtype below, so its scales keep the checkpoint's dtype (fewer bytes).
            packed.append((name, qkernel.kernel_linear_class()(module)))
            continue
        # Widen scales and biases first: mx.dequantize computes in their dtype, so bfloat16 ones
        # (as Hub conversions have) would round every weight to bfloat16.
        biases = module.get("biases")
        weight = mx.dequantize(
            module.weight,
            module.scales.astype(mx.float32),
            None if biases is None else biases.astype(mx.float32),
            module.group_size,
            module.bits,
            module.mode,
        )
        if isinstance(module, nn.QuantizedEmbedding):
            plain: nn.Module = nn.Embedding(*weight.shape)
        else:
            plain = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                plain.bias = module.bias
        plain.weight = weight
        replaced.append((name, plain))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    model.set_dtype(mx.float32, predicate=lambda dtype: mx.issubdtype(dtype, mx.floating))
    if kernel:
        # Float32 linear layers (the checkpoint's or dequantized above) decode through the
        # kernel's float32 product over every core, a tensor rank's sharded linears too.
        packed += qkernel.float_linears(model) + sharded_float_linears(model)
    if packed:
        model.update_modules(tree_unflatten(packed))
    return model
