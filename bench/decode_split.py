"""Where one decode token's time goes, in process: graph building, MLX's other ops, the products.

`python -m bench.decode_split [--tokens 32] [--rounds 3] [--threads 1] [--fuse on|off|both]` loads
the suite's model (8 layers, hidden 1024, intermediate 2816) as float32 and as mlx-lm 4-bit (the
kernel path) and times, per token, for one sequence:

- `step`: a whole decode step as the runner does it (forward + argmax, evaluated);
- `build`: Python building the step's graph alone (mx.async_eval suppressed, nothing evaluated);
- `cheap step`: the same step with every projection replaced by a broadcast of the right shape
  (no product): build + MLX's other ops (norms, RoPE, attention, residuals);
- `products` = step - cheap step: what the matrix products (kernel or MKL) cost, the most a faster
  kernel can ever remove.

`--fuse both` loads each model twice (EXO_FUSE=off and on, exo.inference.fuse) and interleaves
their rounds. Not part of `python -m bench`; figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from bench.kernel_decode import LAYERS, write_decode_models
from exo.inference.blas import load_optimized_blas

PROMPT = [3, 50, 70, 90, 11]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_split", description=__doc__)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fuse", choices=["on", "off", "both"], default="both")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the process's CPU time (less sensitive to other processes on a shared machine)",
    )
    parser.add_argument(
        "--quantile",
        type=float,
        default=0.5,
        help="which per-token time to report (0.1 on a shared machine: the tokens other processes spared)",
    )
    arguments = parser.parse_args(argv)
    os.environ["EXO_KERNEL_THREADS"] = str(arguments.threads)
    load_optimized_blas(arguments.threads)
    import mlx.core as mx
    from mlx import nn

    from exo.inference.shard import ShardModel, ShardSpec, load_shard

    paths = write_decode_models("exo-decode-split-")
    fuses = ["off", "on"] if arguments.fuse == "both" else [arguments.fuse]
    setups: dict[str, ShardModel] = {}
    for name, path in paths.items():
        for fuse in fuses:
            os.environ["EXO_FUSE"] = fuse
            os.environ["EXO_KERNEL"] = "on" if name == "q4" else "off"
            spec = ShardSpec(start_layer=0, end_layer=LAYERS, n_layers=LAYERS)
            setups[f"{name} fuse={fuse}"] = load_shard(path, spec, "float32")

    def step(shard: ShardModel, token: Any, cache: Any) -> Any:
        out = shard.forward(token[:, None], cache)
        return mx.argmax(out[:, -1], axis=-1)

    clock = time.perf_counter if arguments.clock == "wall" else time.process_time

    def per_token_ms(shard: ShardModel, *, build_only: bool = False) -> list[float]:
        cache = shard.make_cache()
        token = mx.argmax(shard.forward(mx.array([PROMPT]), cache)[:, -1], axis=-1)
        mx.eval(token)
        spent: list[float] = []
        for _ in range(arguments.tokens):
            if build_only:
                real = mx.async_eval
                mx.async_eval = lambda *_: None  # pyright: ignore[reportAttributeAccessIssue]
                started = clock()
                following = step(shard, token, cache)
                spent.append(1000 * (clock() - started))
                mx.async_eval = real
                mx.eval(following)
            else:
                started = clock()
                following = step(shard, token, cache)
                mx.eval(following)
                spent.append(1000 * (clock() - started))
            token = following
        return spent

    class Cheap(nn.Module):
        """A projection's output shape with no product (a broadcast view of one input column)."""

        def __init__(self, out: int) -> None:
            super().__init__()
            self.out = out

        def __call__(self, x: Any) -> Any:
            return mx.broadcast_to(x[..., :1], (*x.shape[:-1], self.out))

    def cheapened(shard: ShardModel) -> Callable[[], None]:
        """Swap every projection of the shard's layers for Cheap; returns the undo."""
        swaps: list[tuple[nn.Module, str, nn.Module]] = []
        for layer in shard.layers:
            for _, parent in layer.named_modules():
                for key, child in list(parent.children().items()):
                    if isinstance(child, nn.Module) and _projection_width(child) is not None:
                        swaps.append((parent, key, child))
        for parent, key, child in swaps:
            width = _projection_width(child)
            assert width is not None
            setattr(parent, key, Cheap(width))

        def undo() -> None:
            for parent, key, child in swaps:
                setattr(parent, key, child)

        return undo

    rows: dict[str, dict[str, list[float]]] = {name: {} for name in setups}
    for number in range(arguments.rounds):
        order = list(setups) if number % 2 == 0 else list(reversed(setups))
        for name in order:
            shard = setups[name]
            figures = rows[name]
            figures.setdefault("step", []).extend(per_token_ms(shard))
            figures.setdefault("build", []).extend(per_token_ms(shard, build_only=True))
            undo = cheapened(shard)
            try:
                figures.setdefault("cheap step", []).extend(per_token_ms(shard))
            finally:
                undo()
    print(
        f"load average {os.getloadavg()}, threads {arguments.threads}, {arguments.clock} clock, "
        f"per-token quantile {arguments.quantile} of {arguments.rounds} rounds x {arguments.tokens} tokens"
    )
    for name, figures in rows.items():
        median = {key: _quantile(values, arguments.quantile) for key, values in figures.items()}
        products = median["step"] - median["cheap step"]
        other_ops = median["cheap step"] - median["build"]
        print(
            f"{name}: step {median['step']:.2f} ms ({1000 / median['step']:.0f} tok/s) = build "
            f"{median['build']:.2f} + other ops {other_ops:.2f} + products {products:.2f} ms"
        )


def _quantile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _projection_width(module: Any) -> int | None:
    """Output width of a linear layer of any kind exo holds (None for anything else)."""
    kind = type(module).__name__
    if kind in ("FusedLinear", "FusedSlice"):
        return int(module.width)
    if kind in ("Linear", "QuantizedLinear", "KernelLinear"):
        return int(module["scales"].shape[0] if "scales" in module else module["weight"].shape[0])
    return None


if __name__ == "__main__":
    main()
