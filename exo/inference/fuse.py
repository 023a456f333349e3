"""One product per layer for q/k/v and one for gate/up, set up at load without forking mlx-lm.

On the CPU a decode token's products are small (one row) and each costs a fixed overhead (an MLX
op, a kernel or MKL call, its own pass over the input) besides reading its weight
(docs/benchmarks.md, "Where a decode token's time goes"). mlx-lm's llama, mistral, qwen2 and
qwen3 blocks call `q_proj(x)`, `k_proj(x)`, `v_proj(x)` on the same input, then `gate_proj(x)`,
`up_proj(x)`: so at load the group's weights (float32 `nn.Linear`, `nn.QuantizedLinear` or exo's
`KernelLinear`; packed words, scales and biases alike) are concatenated along the output dim into
one layer of the same kind. The first name (`q_proj`, `gate_proj`) becomes a FusedLinear that
computes the whole product and returns its own slice; the others become FusedSlices handing out
their slice of that product when called on the same input (checked by identity), and computing the
whole product themselves otherwise, so a caller that does anything else stays correct.

Tensor-parallel ranks (mlx-lm's sharded linears, split per rank already) are not fused: load_shard
calls this only without a group. `EXO_FUSE=off` disables it (benches compare both).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import mlx.core as mx
from mlx import nn

from exo.inference import qkernel

# (parent module, the projections computed from one input in this order) in mlx-lm's blocks.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("mlp", ("gate_proj", "up_proj")),
)


def fuse_disabled() -> bool:
    """EXO_FUSE=off (read at each load, so a bench or a test can compare both)."""
    return os.environ.get("EXO_FUSE", "").lower() in ("off", "0", "false", "no")


class _Shared:
    """The group's last product, (input, slices), for the FusedSlices to pick their part from;
    a plain object so the module tree does not count the fused layer twice."""

    __slots__ = ("fused", "last", "offsets")

    def __init__(self, fused: FusedLinear, offsets: list[int]) -> None:
        self.fused = fused
        self.offsets = offsets  # where each projection's slice starts, the first excepted
        self.last: tuple[mx.array, list[mx.array]] | None = None


class FusedLinear(nn.Module):
    """The group's one product (`fused`, a linear layer of the original kind); returns the first
    projection's slice and keeps the others for the FusedSlices."""

    def __init__(self, fused: nn.Module, widths: Sequence[int]) -> None:
        super().__init__()
        self.fused = fused
        self.width = widths[0]
        self.shared = _Shared(self, [sum(widths[: index + 1]) for index in range(len(widths) - 1)])

    def products(self, x: mx.array) -> list[mx.array]:
        parts = mx.split(self.fused(x), self.shared.offsets, axis=-1)
        assert isinstance(parts, list)
        return parts

    def __call__(self, x: mx.array) -> mx.array:
        parts = self.products(x)
        self.shared.last = (x, parts)
        return parts[0]


class FusedSlice(nn.Module):
    """Projection `index` of a fused group: its slice of the product just computed for the same
    input, or (another input) its slice of a product computed afresh."""

    def __init__(self, shared: _Shared, index: int, width: int, *, last: bool) -> None:
        super().__init__()
        self.shared = shared
        self.index = index
        self.width = width
        self.is_last = last

    def __call__(self, x: mx.array) -> mx.array:
        held = self.shared.last
        if held is None or held[0] is not x:
            return self.shared.fused.products(x)[self.index]
        if self.is_last:  # the group is done: do not keep this input's activations alive
            self.shared.last = None
        return held[1][self.index]


def _concatenated(modules: Sequence[nn.Module]) -> nn.Module | None:
    """One layer of the modules' common kind computing all their outputs, or None where they do
    not share a kind (or quantization settings, or the presence of a bias)."""
    kind = type(modules[0])
    if any(type(module) is not kind for module in modules):
        return None
    has_bias = ["bias" in module for module in modules]
    if len(set(has_bias)) != 1:
        return None

    def joined(name: str) -> mx.array:
        return mx.concatenate([module[name] for module in modules], axis=0)

    float_kernel = kind is qkernel.float_linear_class()
    if kind is nn.Linear or float_kernel:
        if len({module["weight"].dtype for module in modules}) != 1:
            return None
        weight = joined("weight")
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias[0])
        fused.weight = weight
        if has_bias[0]:
            fused.bias = joined("bias")
        return qkernel.float_linear_class()(fused) if float_kernel else fused
    kernel = kind is qkernel.kernel_linear_class()
    if kind is not nn.QuantizedLinear and not kernel:
        return None
    settings = {_quantization(module) for module in modules}
    if len(settings) != 1 or any(module.get("biases") is None for module in modules):
        return None
    group_size, bits, mode = settings.pop()
    weight = joined("weight")
    quantized = nn.QuantizedLinear(
        weight.shape[1] * 32 // bits,
        weight.shape[0],
        bias=has_bias[0],
        group_size=group_size,
        bits=bits,
        mode=mode,
    )
    quantized.weight = weight
    quantized.scales = joined("scales")
    quantized.biases = joined("biases")
    if has_bias[0]:
        quantized.bias = joined("bias")
    if kernel:
        return qkernel.kernel_linear_class()(quantized)
    return quantized


def _quantization(module: Any) -> tuple[int, int, str]:
    """(group size, bits, mode) of a quantized layer of either kind."""
    return int(module.group_size), int(module.bits), str(getattr(module, "mode", "affine"))


def _output_width(module: nn.Module) -> int:
    return int(module["weight"].shape[0])


def fuse_layers(layers: Iterable[nn.Module]) -> int:
    """Fuse every group (GROUPS) found in these blocks in place; how many groups were fused."""
    if fuse_disabled():
        return 0
    count = 0
    for layer in layers:
        for parent_name, names in GROUPS:
            parent = layer.get(parent_name) if isinstance(layer, dict) else None
            if not isinstance(parent, nn.Module) or not all(
                isinstance(parent.get(n), nn.Module) for n in names
            ):
                continue
            modules = [parent[name] for name in names]
            fused = _concatenated(modules)
            if fused is None:
                continue
            widths = [_output_width(module) for module in modules]
            # Computed now, group by group: evaluated with the rest of the stage, every group's
            # source arrays and its concatenation would be held at once (+65% peak at load).
            mx.eval(fused.parameters())
            head = FusedLinear(fused, widths)
            setattr(parent, names[0], head)
            for index, name in enumerate(names[1:], 1):
                setattr(
                    parent, name, FusedSlice(head.shared, index, widths[index], last=index == len(names) - 1)
                )
            count += 1
    return count


def fused_sum(modules: Iterable[Any]) -> int:
    """How many FusedLinear groups these modules hold (tests, benches)."""
    return sum(isinstance(child, FusedLinear) for module in modules for _, child in module.named_modules())
