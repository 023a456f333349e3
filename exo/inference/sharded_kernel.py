"""A tensor rank's float32 products through exo's kernel (exo/inference/qkernel.py).

`model.shard(group)` turns a layer's linears into mlx's `AllToShardedLinear` (each rank computes
its slice of the outputs: q/k/v, gate/up) and `ShardedToAllLinear` (each rank a slice of the
inputs, then an all_sum: o_proj, down_proj). For one token both are the same few-rows-times-a-
large-weight product as a whole-model stage's, which the kernel's float32 product computes faster
than MKL's GEMV; without this a tensor rank kept MKL while a one-node stage did not.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from exo.inference import qkernel

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx import nn


def sharded_float_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, replacement) for the model's float32 sharded linears, unless EXO_KERNEL_FLOAT=off.
    An `AllToShardedLinear`'s forward is a plain affine product on this rank's rows (its identity
    `sum_gradients` only matters for training), so the float kernel layer replaces it as is."""
    from mlx.nn.layers.distributed import AllToShardedLinear, ShardedToAllLinear

    if not qkernel.float_enabled():
        return []
    replaced: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if type(module) is AllToShardedLinear:
            replaced.append((name, qkernel.float_linear_class()(module)))
        elif type(module) is ShardedToAllLinear:
            replaced.append((name, sharded_to_all_class()(module)))
    return replaced


@functools.cache
def sharded_to_all_class() -> type:
    """nn.Module computing a `ShardedToAllLinear` with the kernel's product before the all_sum."""
    return _define_sharded_to_all()


def _define_sharded_to_all() -> type:
    import mlx.core as mx
    from mlx import nn

    class FloatKernelShardedToAll(nn.Module):
        """This rank's slice of the inputs times its columns of the weight (the kernel's product
        for up to FLOAT_KERNEL_MAX_ROWS rows, MKL's for more), summed over the group, then the
        bias: mlx's ShardedToAllLinear with another product."""

        def __init__(self, layer: Any) -> None:
            super().__init__()
            self.weight = layer.weight
            if "bias" in layer:
                self.bias = layer.bias
            self.group = layer.group
            self.freeze()

        def __call__(self, x: mx.array) -> mx.array:
            weight = self["weight"]
            y = qkernel.float_gemv(x, weight) if qkernel.decode_shaped(x) else x @ weight.T
            y = mx.distributed.all_sum(y, group=self.group)
            return y + self["bias"] if "bias" in self else y

    return FloatKernelShardedToAll
