"""What a second core adds on this machine, for work that shares nothing: the ceiling for "2 nodes
pinned to one core each against 1".

    python -m bench.core_scaling [--seconds 6]

Runs the same single-threaded MKL float32 matmul loop pinned to core 0 alone, then on cores 0 and 1
at once (two processes), and prints each setup's rate and the pair's total over the single one. Two
shapes: a compute-bound 1024x1024 by 1024x1024 product, and an 8-row product with a 4096x4096
weight (a decode step's shape: weights streamed from memory).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime

LOOP = """
import sys, time
from exo.inference.blas import load_optimized_blas
load_optimized_blas(threads=1)
import mlx.core as mx
size, rows, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
weight = mx.random.normal((size, size)); inputs = mx.random.normal((rows, size)); mx.eval(weight, inputs)
started = time.perf_counter(); count = 0
while time.perf_counter() - started < seconds:
    mx.eval(inputs @ weight); count += 1
print(count / (time.perf_counter() - started))
"""


def pinned(core: int, size: int, rows: int, seconds: float) -> subprocess.Popen[str]:
    command = ["taskset", "-c", str(core), sys.executable, "-c", LOOP, str(size), str(rows), str(seconds)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def rate(process: subprocess.Popen[str]) -> float:
    output, _ = process.communicate(timeout=120)
    return float(output)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=6.0)
    arguments = parser.parse_args()
    print(
        f"# core scaling, {platform.node()} ({platform.machine()}, {os.cpu_count()} cores), "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.1f}"
    )
    print()
    print("| work | core 0 alone (products/s) | cores 0 + 1 together | together / alone |")
    print("|---|---:|---:|---:|")
    for label, size, rows in (("1024 x 1024 @ 1024 x 1024", 1024, 1024), ("8 x 4096 @ 4096 x 4096", 4096, 8)):
        alone = rate(pinned(0, size, rows, arguments.seconds))
        pair = [pinned(core, size, rows, arguments.seconds) for core in (0, 1)]
        first, second = (rate(process) for process in pair)
        print(f"| {label} | {alone:.1f} | {first:.1f} + {second:.1f} | {(first + second) / alone:.2f}x |")


if __name__ == "__main__":
    main()
