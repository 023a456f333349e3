"""A stage's peak RSS against its weights plus the runtime, in process, one fresh process per case.

`python -m bench.stage_rss [--streams 1,8] [--rounds 4] [--decode 32]` loads the benches' 96M llama
(8 layers, hidden 1024, intermediate 2816) as a whole-model stage the way a runner does
(`load_shard(..., "float32")` after the runner's heap settings, exo.inference.heap): float32 by
MKL, and mlx-lm 4-bit (bfloat16 scales) through exo's kernel. Each case runs `--rounds` rounds of
N streams alive together (prompts of 20-120 tokens, `--decode` steps each, taken in turn) and
reports VmHWM: the runtime's before loading (python + mlx + MKL), after loading, and at the end;
"ratio" is the peak over held weight bytes + runtime (issue 14: <= 1.2x). Not part of
`python -m bench`; figures in docs/benchmarks.md ("Where a stage's peak RSS goes").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LAYERS = 8


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_models(root: Path) -> dict[str, Path]:
    """The two checkpoints, written by the parent (making them would raise a case's HWM)."""
    import msgspec

    from exo.inference.synthetic import SyntheticModelSpec, write_synthetic_model

    spec = SyntheticModelSpec(layers=LAYERS, hidden=1024, intermediate=2816, heads=16, kv_heads=8, vocab=1024)
    q4 = msgspec.structs.replace(spec, dtype="bfloat16", quantize_bits=4, group_size=64)
    return {"q4": write_synthetic_model(root / "q4", q4), "f32": write_synthetic_model(root / "f32", spec)}


def case(path: Path, streams: int, rounds: int, decode: int) -> dict[str, float]:
    """One case, in this (fresh) process."""
    from exo.inference.blas import load_optimized_blas

    load_optimized_blas(2)
    from exo.inference.heap import release_freed_buffers

    release_freed_buffers()
    import mlx.core as mx

    from exo.inference.shard import ShardSpec, load_shard

    mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)))  # the runtime's first product (MKL's buffers)
    runtime = _status_mib("VmHWM")
    shard = load_shard(path, ShardSpec(start_layer=0, end_layer=LAYERS, n_layers=LAYERS), "float32")
    loaded = _status_mib("VmHWM")
    for _ in range(rounds):
        caches = [shard.make_cache() for _ in range(streams)]
        tokens = []
        for number, cache in enumerate(caches):
            length = 20 + (100 * number) // max(streams - 1, 1)
            prompt = mx.array([[(7 * i + number) % 1000 + 3 for i in range(length)]])
            tokens.append(mx.argmax(shard.forward(prompt, cache)[:, -1], axis=-1))
            mx.eval(tokens[-1])
        for _ in range(decode):
            for number, cache in enumerate(caches):
                tokens[number] = mx.argmax(shard.forward(tokens[number][:, None], cache)[:, -1], axis=-1)
                mx.eval(tokens[number])
        del caches, tokens
    weights = shard.weight_bytes / 2**20
    peak = _status_mib("VmHWM")
    return {
        "weights": weights,
        "runtime": runtime,
        "loaded": loaded,
        "peak": peak,
        "rss_after": _status_mib("VmRSS"),
        "mlx_peak": mx.get_peak_memory() / 2**20,
        "ratio": peak / (weights + runtime),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stage_rss", description=__doc__)
    parser.add_argument("--streams", default="1,8", help="comma-separated stream counts")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.case:
        streams, path = arguments.case.split(":", 1)
        print(json.dumps(case(Path(path), int(streams), arguments.rounds, arguments.decode)))
        return
    paths = write_models(Path(tempfile.mkdtemp(prefix="exo-stage-rss-")))
    header = ["stage", "streams", "weights MiB", "runtime HWM", "after load HWM", "peak HWM / RSS after"]
    print("| " + " | ".join([*header, "MLX peak", "peak / (weights + runtime)"]) + " |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for model in ("q4", "f32"):
        for streams in (int(value) for value in arguments.streams.split(",")):
            command = [sys.executable, "-m", "bench.stage_rss", "--case", f"{streams}:{paths[model]}"]
            command += ["--rounds", str(arguments.rounds), "--decode", str(arguments.decode)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            cells = [model, str(streams), *(f"{row[key]:.0f}" for key in ("weights", "runtime", "loaded"))]
            cells += [
                f"{row['peak']:.0f} / {row['rss_after']:.0f}",
                f"{row['mlx_peak']:.0f}",
                f"{row['ratio']:.2f}x",
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
