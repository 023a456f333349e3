"""Would a hand-written CPU kernel beat MKL's float32 GEMV for decode? A measurement, not a path.

    .venv/bin/python -m bench.kernel_probe [--out 2816 --in 1024] [--repeats 200]

Times y = x W^T for decode shapes (1 and 8 rows of x, the model's largest weight) three ways, each
the best of interleaved rounds: MLX with MKL on float32 weights (what a runner runs today), MLX's
own `quantized_matmul` on mlx-lm 4-bit weights (bfloat16 and float32 scales), and
bench/kernels/q4_gemv.c (AVX2, OpenMP over output rows) on the same 4-bit weights with 1 and 2
threads, built here with the system C compiler. Prints the times, the bytes of weights each
reads per call and the implied GB/s, and checks the kernel's output against the dequantized
product. Results go in docs/inference.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from exo.inference.blas import load_optimized_blas

KERNEL = Path(__file__).resolve().parent / "kernels" / "q4_gemv.c"


def build(directory: Path) -> Path:
    library = directory / "libq4gemv.so"
    command = [
        "cc",
        "-O3",
        "-mavx2",
        "-mfma",
        "-fopenmp",
        "-shared",
        "-fPIC",
        "-o",
        str(library),
        str(KERNEL),
    ]
    subprocess.run(command, check=True)
    return library


def best_time(call: Callable[[], object], repeats: int) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=int, default=2816)
    parser.add_argument("--in", dest="inputs", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--working-set-mib", type=int, default=512, help="float32 bytes cycled through")
    arguments = parser.parse_args()
    load_optimized_blas()
    import mlx.core as mx
    import numpy as np

    out, inputs = arguments.out, arguments.inputs
    # Enough distinct weights that they do not fit in the caches (decode reads every weight of the
    # model once per token): each call takes the next one, round robin.
    copies = max(2, arguments.working_set_mib * 2**20 // (out * inputs * 4))
    layers = []
    for index in range(copies):
        weight = mx.random.normal((out, inputs), key=mx.random.key(index)) * 0.02
        packed, scales, biases = mx.quantize(weight.astype(mx.bfloat16), group_size=64, bits=4)
        scales32, biases32 = scales.astype(mx.float32), biases.astype(mx.float32)
        dequantized = mx.dequantize(packed, scales32, biases32, 64, 4)
        mx.eval(packed, scales, biases, dequantized, scales32, biases32)
        numpy_arrays = [np.array(packed, copy=False), np.array(scales32), np.array(biases32)]
        layers.append((packed, scales, biases, scales32, biases32, dequantized, numpy_arrays))
    turn = [0]

    def next_layer() -> tuple:  # type: ignore[type-arg]
        turn[0] = (turn[0] + 1) % copies
        return layers[turn[0]]

    packed, dequantized, (_, scales_np, biases_np) = layers[0][0], layers[0][5], layers[0][6]

    with tempfile.TemporaryDirectory() as directory:
        library = ctypes.CDLL(str(build(Path(directory))))
    kernel = library.q4_gemv
    pointer = ctypes.c_void_p
    kernel.argtypes = [
        pointer,
        ctypes.c_int,
        ctypes.c_int,
        pointer,
        pointer,
        pointer,
        ctypes.c_int,
        pointer,
        pointer,
    ]
    set_threads = ctypes.CDLL("libgomp.so.1").omp_set_num_threads

    float32_bytes = out * inputs * 4
    q4_bytes = packed.nbytes + scales_np.nbytes + biases_np.nbytes
    print(f"weight {out}x{inputs}: float32 {float32_bytes / 2**20:.1f} MiB, 4-bit {q4_bytes / 2**20:.2f} MiB "
          f"(with float32 scales); {copies} copies cycled")  # fmt: skip
    print("| rows | what | threads | µs per call | weight GB/s |")
    print("|---|---|---|---:|---:|")
    for rows in (1, 8):
        x = mx.random.normal((rows, inputs), key=mx.random.key(rows))
        mx.eval(x)
        x_np = np.ascontiguousarray(np.array(x))
        y_np = np.zeros((rows, out), dtype=np.float32)
        work = np.zeros(rows * inputs + rows * (inputs // 64), dtype=np.float32)

        def c_kernel(
            x_np: np.ndarray = x_np, y_np: np.ndarray = y_np, work: np.ndarray = work, rows: int = rows
        ) -> None:
            packed_np, scales_np, biases_np = next_layer()[6]
            kernel(x_np.ctypes.data, rows, inputs, packed_np.ctypes.data, scales_np.ctypes.data,
                   biases_np.ctypes.data, out, y_np.ctypes.data, work.ctypes.data)  # fmt: skip

        turn[0] = copies - 1  # the next call uses layers[0], which `expected` is computed from
        c_kernel()
        expected = np.array(x @ dequantized.T)
        error = float(np.abs(y_np - expected).max() / np.abs(expected).max())

        def quantized(x: mx.array, layer: tuple, scales_at: int) -> None:  # type: ignore[type-arg]
            scales, biases = layer[scales_at], layer[scales_at + 1]
            mx.eval(mx.quantized_matmul(x, layer[0], scales, biases, True, 64, 4))

        cases: list[tuple[str, str, Callable[[], object], int]] = [
            ("MLX float32 (MKL)", str(os.environ.get("MKL_NUM_THREADS", "all")),
             lambda x=x: mx.eval(x @ next_layer()[5].T), float32_bytes),
            ("MLX quantized_matmul, bf16 scales", "mlx",
             lambda x=x: quantized(x, next_layer(), 1), q4_bytes),
            ("MLX quantized_matmul, f32 scales", "mlx",
             lambda x=x: quantized(x, next_layer(), 3),
             q4_bytes),
        ]  # fmt: skip
        for what, threads, call, read in cases:
            seconds = best_time(call, arguments.repeats)
            print(f"| {rows} | {what} | {threads} | {seconds * 1e6:.0f} | {read / seconds / 1e9:.1f} |")
        for threads in (1, 2):
            set_threads(threads)
            seconds = best_time(c_kernel, arguments.repeats)
            print(f"| {rows} | q4_gemv.c (AVX2), rel. error {error:.1e} | {threads} | {seconds * 1e6:.0f} "
                  f"| {q4_bytes / seconds / 1e9:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
