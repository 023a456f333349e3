"""In-process decode: a 4-bit checkpoint through exo's CPU kernel against the float32 checkpoint.

`python -m bench.kernel_decode [--rows 1] [--tokens 48] [--rounds 4] [--threads 2] [--dequantized]`
builds the suite's model (8 layers, hidden 1024, intermediate 2816) as float32 and as mlx-lm 4-bit
from bfloat16 (group 64, bfloat16 scales), loads each as a whole-model stage the way a runner does
(`load_shard(..., "float32")`: the 4-bit one keeps its linear layers packed for the kernel), and
decodes greedily `--rows` sequences at once, rounds interleaved (every other one reversed). No HTTP,
no scheduler: the products alone, plus MLX's graph. `--threads` sets MKL's threads and the kernel's
(EXO_KERNEL_THREADS); `--dequantized` adds the 4-bit checkpoint dequantized to float32 (EXO_KERNEL=off);
`--unfused` adds both models without fused q/k/v and gate/up products (EXO_FUSE=off).
Not part of `python -m bench`; figures in docs/benchmarks.md ("exo's CPU kernel, in process").
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from exo.inference.blas import load_optimized_blas

LAYERS = 8
PROMPT = [3, 50, 70, 90, 11]


def write_decode_models(prefix: str) -> dict[str, Path]:
    """The decode benches' 96M llama in a new temporary folder: float32 ("f32") and mlx-lm 4-bit
    from bfloat16, group 64, as Hub conversions are ("q4"). Call after load_optimized_blas."""
    from exo.inference.synthetic import SyntheticModelSpec, write_synthetic_model

    root = Path(tempfile.mkdtemp(prefix=prefix))
    base = SyntheticModelSpec(layers=LAYERS, hidden=1024, intermediate=2816, heads=16, kv_heads=8, vocab=1024)
    return {
        "f32": write_synthetic_model(root / "f32", base),
        "q4": write_synthetic_model(
            root / "q4", msgspec.structs.replace(base, dtype="bfloat16", quantize_bits=4, group_size=64)
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_decode", description=__doc__)
    parser.add_argument("--rows", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dequantized", action="store_true")
    parser.add_argument(
        "--unfused", action="store_true", help="add each model loaded with EXO_FUSE=off (exo.inference.fuse)"
    )
    arguments = parser.parse_args(argv)
    os.environ["EXO_KERNEL_THREADS"] = str(arguments.threads)
    load_optimized_blas(arguments.threads)
    import mlx.core as mx

    from exo.inference.shard import ShardModel, ShardSpec, load_shard

    paths = write_decode_models("exo-kernel-decode-")

    def load(name: str, *, kernel: bool, fuse: bool = True) -> ShardModel:
        os.environ["EXO_KERNEL"] = "on" if kernel else "off"
        os.environ["EXO_FUSE"] = "on" if fuse else "off"
        os.environ["EXO_KERNEL_FLOAT"] = "on"
        spec = ShardSpec(start_layer=0, end_layer=LAYERS, n_layers=LAYERS)
        return load_shard(paths[name], spec, "float32")

    setups = {
        "f32": load("f32", kernel=False),
        "f32_kernel": load("f32", kernel=True),
        "q4_kernel": load("q4", kernel=True),
    }
    if arguments.dequantized:
        setups["q4_dequantized"] = load("q4", kernel=False)
    if arguments.unfused:
        setups["f32_unfused"] = load("f32", kernel=False, fuse=False)
        setups["q4_kernel_unfused"] = load("q4", kernel=True, fuse=False)

    def decode(shard: ShardModel) -> float:
        cache = shard.make_cache()
        out = shard.forward(mx.array([PROMPT] * arguments.rows), cache)
        token = mx.argmax(out[:, -1], axis=-1)
        mx.eval(token)
        started = time.perf_counter()
        for _ in range(arguments.tokens):
            out = shard.forward(token[:, None], cache)
            token = mx.argmax(out[:, -1], axis=-1)
            mx.async_eval(token)
        mx.eval(token)
        return arguments.tokens * arguments.rows / (time.perf_counter() - started)

    results: dict[str, list[float]] = {name: [] for name in setups}
    for number in range(arguments.rounds):
        order = list(setups) if number % 2 == 0 else list(reversed(setups))
        for name in order:
            results[name].append(decode(setups[name]))
    print(f"load average {os.getloadavg()}, rows {arguments.rows}, threads {arguments.threads}")
    for name, values in results.items():
        print(
            f"{name}: {setups[name].weight_bytes / 2**20:.0f} MiB held, tok/s best {max(values):.1f} "
            f"median {statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})"
        )
    for name, values in results.items():
        if name != "f32":
            best = max(values) / max(results["f32"])
            median = statistics.median(values) / statistics.median(results["f32"])
            print(f"{name} / f32: {best:.2f}x best, {median:.2f}x median")


if __name__ == "__main__":
    main()
