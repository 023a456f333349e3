"""Choose the BLAS that MLX's CPU backend calls, before MLX is imported.

`mlx[cpu]` on Linux links a reference BLAS (netlib), several times slower than an optimized one for
the float32 matmuls that dominate decoding. Loading Intel MKL's single dynamic library with
RTLD_GLOBAL before `mlx.core` is imported makes the dynamic linker resolve `cblas_sgemm` & co. to
MKL for every library loaded afterwards, libmlx included. Once mlx is imported the choice is fixed
for the life of the process, which is why every entry point of exo.inference calls
`load_optimized_blas()` first.

`EXO_BLAS=reference` keeps the reference BLAS (to compare, or when MKL misbehaves).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

import msgspec

BlasName = Literal["mkl", "reference", "unknown"]


class BlasInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which BLAS this process uses, and why."""

    library: BlasName
    path: str | None
    threads: int | None
    reason: str


class BlasCheck(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A short float32 matmul timed in this process, plus the BLAS seen in /proc/self/maps."""

    library: BlasName
    loaded_paths: list[str]
    gflops: float
    matrix_size: int


class _ProcessBlas:
    """What this process chose; the choice is made once, before mlx is imported."""

    loaded: BlasInfo | None = None
    mkl_handle: ctypes.CDLL | None = None


_process = _ProcessBlas()


def _find_mkl_runtime() -> Path | None:
    """libmkl_rt from the PyPI `mkl` wheel (it installs into the environment's lib/)."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = sorted(
        Path(str(entry.locate())).resolve() for entry in files if entry.name.startswith("libmkl_rt.so")
    )
    existing = [candidate for candidate in candidates if candidate.is_file()]
    return existing[0] if existing else None


def _set_mkl_threads(handle: ctypes.CDLL, threads: int) -> int:
    handle.MKL_Set_Num_Threads(ctypes.c_int(threads))
    return int(handle.MKL_Get_Max_Threads())


def load_optimized_blas(threads: int | None = None) -> BlasInfo:
    """Load MKL for MLX on Linux x86_64; call before anything imports mlx. Idempotent.

    `threads` defaults to the cores this process may run on. Returns what was chosen; never raises
    for a missing MKL (it falls back to the reference BLAS and says why). If mlx was imported
    first, loading MKL now would change nothing: it warns and reports what is mapped.
    """
    if _process.loaded is not None:
        loaded = _process.loaded
        if threads is not None and _process.mkl_handle is not None and threads != loaded.threads:
            actual = _set_mkl_threads(_process.mkl_handle, threads)
            _process.loaded = msgspec.structs.replace(loaded, threads=actual)
        return _process.loaded
    _process.loaded = _choose_blas(threads)
    return _process.loaded


def _choose_blas(threads: int | None) -> BlasInfo:
    if os.environ.get("EXO_BLAS", "").strip().lower() == "reference":
        return BlasInfo(library="reference", path=None, threads=None, reason="EXO_BLAS=reference")
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return BlasInfo(library="unknown", path=None, threads=None, reason="MKL is only used on Linux x86_64")
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx was imported before load_optimized_blas(): its BLAS is already fixed", stacklevel=2
        )
        return BlasInfo(
            library=blas_in_use(), path=None, threads=None, reason="mlx was imported before the BLAS choice"
        )
    runtime = _find_mkl_runtime()
    if runtime is None:
        warnings.warn("the `mkl` package is not installed: MLX uses its reference BLAS", stacklevel=2)
        return BlasInfo(library="reference", path=None, threads=None, reason="mkl package not installed")
    wanted_threads = threads if threads is not None else len(os.sched_getaffinity(0))
    # MKL reads these when it initialises; the explicit call below makes the count certain.
    os.environ.setdefault("MKL_INTERFACE_LAYER", "LP64")
    os.environ["MKL_NUM_THREADS"] = str(wanted_threads)
    # OpenMP threads otherwise spin for 200 ms after each parallel region, taking the cores from
    # the other pipeline stages (and the node) that share this machine.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        handle = ctypes.CDLL(str(runtime), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        warnings.warn(f"could not load MKL ({error}): MLX uses its reference BLAS", stacklevel=2)
        return BlasInfo(library="reference", path=None, threads=None, reason=f"MKL failed to load: {error}")
    _process.mkl_handle = handle
    actual_threads = _set_mkl_threads(handle, wanted_threads)
    return BlasInfo(library="mkl", path=str(runtime), threads=actual_threads, reason="loaded")


def loaded_blas_libraries() -> list[str]:
    """Paths of BLAS libraries mapped into this process, read from /proc/self/maps."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths: set[str] = set()
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        name = Path(fields[5]).name
        if name.startswith(("libmkl_rt", "libblas", "libopenblas", "libcblas")):
            paths.add(fields[5])
    return sorted(paths)


def blas_in_use() -> BlasName:
    """MKL if its runtime is mapped (its symbols then win), else the reference BLAS mlx links."""
    paths = loaded_blas_libraries()
    if any(Path(path).name.startswith("libmkl_rt") for path in paths):
        return "mkl"
    if paths:
        return "reference"
    return "unknown"


def check_blas(matrix_size: int = 512, repeats: int = 3) -> BlasCheck:
    """Time a float32 matmul (best of `repeats`) and report which BLAS is mapped. Imports mlx."""
    load_optimized_blas()
    import mlx.core as mx

    left = mx.random.normal((matrix_size, matrix_size), dtype=mx.float32, key=mx.random.key(0))
    right = mx.random.normal((matrix_size, matrix_size), dtype=mx.float32, key=mx.random.key(1))
    mx.eval(left, right, left @ right)  # warm-up: first call pays thread-pool start
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(left @ right)
        best = min(best, time.perf_counter() - started)
    flops = 2.0 * matrix_size**3
    return BlasCheck(
        library=blas_in_use(),
        loaded_paths=loaded_blas_libraries(),
        gflops=flops / best / 1e9,
        matrix_size=matrix_size,
    )


if __name__ == "__main__":
    print(load_optimized_blas())
    print(check_blas())
