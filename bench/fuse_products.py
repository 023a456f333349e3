"""The projections alone, fused against unfused: `python -m bench.fuse_products [--threads 2]`.

Eight layers of the benches' 96M llama (hidden 1024, q 1024 / k 512 / v 512 / gate and up 2816
outputs), float32 and 4-bit (exo's KernelLinear, group 64, bfloat16 scales), random weights; each
iteration evaluates every layer's five projections of one row, the unfused and the fused copy
(exo.inference.fuse) alternating every iteration, so other processes' load hits both alike. Prints
min / 10th percentile / median ms. Not part of `python -m bench`; figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from exo.inference.blas import load_optimized_blas

OUTPUTS = {
    "self_attn": {"q_proj": 1024, "k_proj": 512, "v_proj": 512},
    "mlp": {"gate_proj": 2816, "up_proj": 2816},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fuse_products", description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=300)
    arguments = parser.parse_args(argv)
    os.environ["EXO_KERNEL_THREADS"] = str(arguments.threads)
    load_optimized_blas(arguments.threads)
    import mlx.core as mx
    from mlx import nn

    from exo.inference import qkernel
    from exo.inference.fuse import fuse_layers

    kernel_linear = qkernel.kernel_linear_class() if qkernel.load_kernel() is not None else None

    def layer(kind: str) -> Any:
        block = nn.Module()
        for part, outputs in OUTPUTS.items():
            parent = nn.Module()
            for name, width in outputs.items():
                linear: Any = nn.Linear(1024, width, bias=False)
                if kind == "4-bit" and kernel_linear is not None:
                    quantized = nn.QuantizedLinear.from_linear(linear, 64, 4)
                    quantized.scales = quantized["scales"].astype(mx.bfloat16)
                    quantized.biases = quantized["biases"].astype(mx.bfloat16)
                    linear = kernel_linear(quantized)
                setattr(parent, name, linear)
            setattr(block, part, parent)
        mx.eval(block.parameters())
        return block

    def products(layers: list[Any], x: Any) -> list[Any]:
        return [
            getattr(block[part], name)(x) for block in layers for part in OUTPUTS for name in OUTPUTS[part]
        ]

    for kind in ("float32", "4-bit"):
        plain = [layer(kind) for _ in range(8)]
        fused = [layer(kind) for _ in range(8)]
        fuse_layers(fused)
        x = mx.random.normal((1, 1, 1024))
        mx.eval(x)
        times: dict[str, list[float]] = {"unfused": [], "fused": []}
        for iteration in range(arguments.iterations):
            pairs = [("unfused", plain), ("fused", fused)]
            for name, layers in pairs if iteration % 2 else reversed(pairs):
                started = time.perf_counter()
                mx.eval(products(layers, x))
                times[name].append(1000 * (time.perf_counter() - started))
        for name, values in times.items():
            values.sort()
            print(
                f"{kind} {arguments.threads} thread(s) {name}: 8 layers' products, ms: min {values[0]:.2f} "
                f"p10 {values[len(values) // 10]:.2f} median {values[len(values) // 2]:.2f}"
            )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
