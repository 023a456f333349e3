"""exo's CPU decode kernel for mlx-lm's quantized weights, built on first use.

MLX's CPU backend dequantizes a quantized product in the scales' dtype and has no fast path for
few rows, so a 4-bit model decodes at a fraction of float32 (docs/inference.md). The kernel
(`exo/inference/kernels/qgemv.cpp`, an MLX primitive: AVX2+FMA with a scalar fallback, chosen at
run time) reads the packed weights directly inside MLX's graph. It is compiled with cmake and the
C++ compiler against the installed mlx and nanobind into a cache dir the first time a process asks
for it (like torch.utils.cpp_extension.load); later processes load the cached module. Without a
compiler, or when the build fails, `load_kernel()` returns None, logs one line, and callers keep
the pure-MLX path.

The same module computes float32 linear layers' decode products over every core (MKL's few-row
GEMV runs on one): `FloatKernelLinear`, used by every stage held as float32.

`EXO_KERNEL=off` disables it (`EXO_KERNEL_FLOAT=off` only its float32 product); `EXO_KERNEL_CACHE`
overrides the cache dir (default `$EXO_HOME/kernels`, `~/.exo/kernels`); `python -m
exo.inference.qkernel` builds it ahead.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from filelock import FileLock

if TYPE_CHECKING:
    import mlx.core as mx
    from mlx import nn

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "kernels"
MODULE_NAME = "_exo_qgemv"
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
BUILD_TIMEOUT_S = 600.0
# Inputs of more rows than this (prompt chunks) multiply the weight dequantized to float32 by the
# kernel module (~3-5 ms for 1024x2816) with a float32 matmul (MKL): measured on the 2-core VM
# (1024x2816, 4-bit), the kernel takes 5.5 / 12 / 32 / 69 ms for 16 / 32 / 64 / 128 rows against
# 12 / 14 / 23 / 36 ms dequantized; below ~32 rows the kernel wins.
KERNEL_MAX_ROWS = 32
# Float32 linear layers: up to this many rows (decode, a few streams) go through the kernel
# module's float32 product, which streams the weight over every core; MKL's GEMV/GEMM for so few
# rows runs on one (docs/inference.md). Prompt chunks keep MKL's GEMM.
FLOAT_KERNEL_MAX_ROWS = 8


class _State:
    """This process's one build-or-load attempt (module-level, so every layer shares it)."""

    loaded: ModuleType | None = None
    tried = False
    failure: str | None = None
    background_build: bool = False


_state = _State()


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled or imported here (no compiler, a failed build)."""


def cache_dir() -> Path:
    """Where built kernels live: one subfolder per source + mlx + Python version."""
    explicit = os.environ.get("EXO_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    home = os.environ.get("EXO_HOME")
    return (Path(home) if home else Path.home() / ".exo") / "kernels"


def _build_key() -> str:
    import nanobind

    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    versions = f"{importlib.metadata.version('mlx')} {nanobind.__version__} {sys.version}"
    digest.update(f"{versions} {platform.machine()}".encode())
    return digest.hexdigest()[:16]


def _find_built(folder: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = folder / f"{MODULE_NAME}{suffix}"
        if candidate.exists():
            return candidate
    return None


def build(folder: Path) -> Path:
    """Configure and compile the kernel into `folder`; the path of the built module."""
    import mlx.core as mx
    import nanobind

    cmake = shutil.which("cmake")
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cmake is None or compiler is None:
        raise KernelBuildError(f"needs cmake and a C++ compiler (cmake: {cmake}, c++: {compiler})")
    mlx_dir = Path(str(mx.__file__)).parent  # mlx itself is a namespace package
    build_dir = folder / "build"
    prefix = f"{mlx_dir};{nanobind.cmake_dir()}"
    steps = [
        [
            cmake,
            "-S",
            str(SOURCE_DIR),
            "-B",
            str(build_dir),
            f"-DCMAKE_PREFIX_PATH={prefix}",
            f"-DCMAKE_CXX_COMPILER={compiler}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={folder}",
        ],
        [cmake, "--build", str(build_dir), "-j", str(min(os.cpu_count() or 1, 4))],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as error:
            raise KernelBuildError(f"{step[1]} timed out after {BUILD_TIMEOUT_S:.0f}s") from error
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-12:]
            raise KernelBuildError(f"{' '.join(step[:2])} failed:\n" + "\n".join(tail))
    built = _find_built(folder)
    if built is None:
        raise KernelBuildError(f"the build produced no {MODULE_NAME} module in {folder}")
    shutil.rmtree(build_dir, ignore_errors=True)
    return built


def _import(path: Path) -> ModuleType:
    import mlx.core  # noqa: F401  (registers the array type the module's functions take)

    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise KernelBuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _self_check(module)
    return module


def _self_check(module: Any) -> None:
    """One small product against mx.dequantize: a module built for another mlx (a nanobind ABI
    that does not match takes no mx.array) or a wrong result keeps the pure-MLX path."""
    import mlx.core as mx

    weight = mx.arange(64 * 128, dtype=mx.float32).reshape(64, 128) % 7 - 3
    packed, scales, biases = mx.quantize(weight, 64, 4)
    x = mx.ones((1, 128))
    try:
        got = module.quantized_gemv(x, packed, scales, biases, 64, 4)
    except TypeError as error:
        raise KernelBuildError(f"the built module does not take this mlx's arrays: {error}") from error
    expected = x @ mx.dequantize(packed, scales, biases, 64, 4).T
    if not mx.allclose(got, expected, rtol=1e-5, atol=1e-4).item():
        raise KernelBuildError("the built module's self-check product is wrong")


def load_kernel(*, required: bool = False) -> ModuleType | None:
    """The compiled kernel module, building it once per source/mlx/Python version; None (with one
    log line) where it cannot be built, unless `required` (then KernelBuildError)."""
    state = _state
    if disabled():
        if required:
            raise KernelBuildError("disabled by EXO_KERNEL=off")
        return None
    if not state.tried:
        state.tried = True
        try:
            folder = cache_dir() / _build_key()
            folder.mkdir(parents=True, exist_ok=True)
            with FileLock(str(folder / ".lock"), timeout=BUILD_TIMEOUT_S + 60):
                built = _find_built(folder) or build(folder)
            state.loaded = _import(built)
        except Exception as error:  # any failure keeps the pure-MLX path
            state.failure = f"{type(error).__name__}: {error}"
            first_line = state.failure.splitlines()[0]
            log.warning("exo's CPU quantized kernel is not used (pure-MLX path): %s", first_line)
    if state.loaded is None and required:
        raise KernelBuildError(state.failure or "kernel not available")
    return state.loaded


def built_kernel() -> ModuleType | None:
    """The kernel where this machine has it built already (or this process loaded it); never a
    build on the load path. Float32 layers only go faster with it, so a stage loads with MKL
    rather than wait 1-2.5 minutes for a first build on a fresh machine; one build then starts in
    the background for the next load. Quantized layers, which need it, call load_kernel()."""
    state = _state
    if disabled():
        return None
    if state.tried:
        return state.loaded
    try:
        built = _find_built(cache_dir() / _build_key())
    except Exception as error:  # e.g. nanobind missing: the same path load_kernel would refuse
        log.debug("exo's CPU kernel is not looked for: %s", error)
        return None
    if built is None:
        if not state.background_build:
            state.background_build = True
            _build_in_background()
        return None
    return load_kernel()


def _build_in_background() -> None:
    """`python -m exo.inference.qkernel` in its own session at low priority: it builds under the
    same file lock as load_kernel, so concurrent runners build once."""
    command = [sys.executable, "-m", "exo.inference.qkernel"]
    nice = shutil.which("nice")
    try:
        subprocess.Popen(
            [nice, "-n", "10", *command] if nice else command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as error:
        log.warning("exo's CPU kernel could not start its background build: %s", error)


def disabled() -> bool:
    """EXO_KERNEL=off (read on every call, so a test or a bench can switch paths)."""
    return os.environ.get("EXO_KERNEL", "").lower() in ("off", "0", "false", "no")


def kernel_supports(bits: int, group_size: int, mode: str, in_features: int) -> bool:
    """Whether a quantized layer of this kind can use the kernel (the others stay as they are)."""
    per_block = 8 * (32 // bits) if bits in SUPPORTED_BITS else 0
    return (
        mode == "affine"
        and bits in SUPPORTED_BITS
        and group_size in SUPPORTED_GROUP_SIZES
        and in_features % per_block == 0
    )


def quantized_gemv(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int, bits: int
) -> mx.array:
    """y = x @ dequantize(w, scales, biases).T in float32 through the kernel (x float32)."""
    module: Any = _state.loaded if _state.loaded is not None else load_kernel(required=True)
    return module.quantized_gemv(x, w, scales, biases, group_size, bits)


def dequantize_f32(
    w: mx.array, scales: mx.array, biases: mx.array, *, group_size: int, bits: int
) -> mx.array:
    """The float32 weight s*q + b (bit for bit mx.dequantize with float32 scales), computed by the
    kernel module: mx.dequantize on the CPU is several times slower."""
    module: Any = _state.loaded if _state.loaded is not None else load_kernel(required=True)
    return module.dequantize(w, scales, biases, group_size, bits)


def float_gemv(x: mx.array, w: mx.array) -> mx.array:
    """y = x @ w.T for float32 x (..., in) and w (out, in), over every core (few rows of x)."""
    module: Any = _state.loaded if _state.loaded is not None else load_kernel(required=True)
    return module.float_gemv(x, w)


def kernel_expected() -> bool:
    """Whether a runner here will likely use the kernel (placement sizes packed layers then),
    decided without importing mlx: enabled, x86_64 with AVX2 (the fast path), and a toolchain or
    a cached build."""
    if disabled():
        return False
    if platform.machine() not in ("x86_64", "AMD64") or not _cpu_has_avx2():
        return False
    return _toolchain_or_build(cache_dir())


@functools.cache
def _toolchain_or_build(folder: Path) -> bool:
    """A compiler on PATH or a module already built under `folder`: asked once per process (and
    cache dir), since placement sizes every model's footprint with it and PATH lookups plus a
    glob per call add up."""
    return bool(shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))) or any(
        folder.glob(f"*/{MODULE_NAME}*")
    )


@functools.cache
def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and " f16c" in flags


@functools.cache
def kernel_linear_class() -> type:
    """nn.Module for a quantized linear layer computed by the kernel (defined lazily: mlx is
    imported only by runners)."""
    return _define_kernel_linear()


def _define_kernel_linear() -> type:
    from mlx import nn

    class KernelLinear(nn.Module):
        """mlx-lm's QuantizedLinear with its packed weight, scales and biases as the checkpoint
        has them, computed in float32: by the kernel for up to KERNEL_MAX_ROWS rows (decode),
        through a float32 weight dequantized on the fly for more (prefill)."""

        def __init__(self, layer: nn.QuantizedLinear) -> None:
            super().__init__()
            self.weight = layer.weight
            self.scales = layer.scales
            self.biases = layer.biases
            if "bias" in layer:
                self.bias = layer.bias
            self.group_size = layer.group_size
            self.bits = layer.bits
            self.freeze()

        def __call__(self, x: mx.array) -> mx.array:
            import mlx.core as mx

            x = x.astype(mx.float32)
            layer = (self["weight"], self["scales"], self["biases"])
            if x.size // max(x.shape[-1], 1) > KERNEL_MAX_ROWS:
                y = x @ dequantize_f32(*layer, group_size=self.group_size, bits=self.bits).T
            else:
                y = quantized_gemv(x, *layer, group_size=self.group_size, bits=self.bits)
            if "bias" in self:
                y = y + self["bias"]
            return y

    return KernelLinear


def float_enabled() -> bool:
    """Whether float32 linear layers use the kernel's float32 product (EXO_KERNEL_FLOAT=off: MKL
    for every float32 product, and a model without quantized layers never builds the kernel)."""
    return os.environ.get("EXO_KERNEL_FLOAT", "").lower() not in ("off", "0", "false", "no")


def float_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, replacement) for the model's float32 `nn.Linear` layers (exactly that class: sharded
    layers keep theirs), unless EXO_KERNEL_FLOAT=off (MKL for every float32 product)."""
    from mlx import nn

    if not float_enabled():
        return []
    float_linear = float_linear_class()
    return [
        (name, float_linear(module)) for name, module in model.named_modules() if type(module) is nn.Linear
    ]


def decode_shaped(x: mx.array) -> bool:
    """Whether the kernel's float32 product takes x (float32, at most FLOAT_KERNEL_MAX_ROWS rows);
    more rows go to MLX's matmul (MKL's GEMM)."""
    import mlx.core as mx

    return x.dtype == mx.float32 and x.size // max(x.shape[-1], 1) <= FLOAT_KERNEL_MAX_ROWS


@functools.cache
def float_linear_class() -> type:
    """nn.Module for a float32 linear layer whose decode products go through the kernel."""
    return _define_float_linear()


def _define_float_linear() -> type:
    from mlx import nn

    class FloatKernelLinear(nn.Module):
        """nn.Linear (float32) computed by the kernel's float32 product for up to
        FLOAT_KERNEL_MAX_ROWS rows of x, by MLX's matmul (MKL's GEMM) for more."""

        def __init__(self, layer: nn.Linear) -> None:
            super().__init__()
            self.weight = layer.weight
            if "bias" in layer:
                self.bias = layer.bias
            self.freeze()

        def __call__(self, x: mx.array) -> mx.array:
            import mlx.core as mx

            weight = self["weight"]
            if decode_shaped(x):
                y = float_gemv(x, weight)
                return y + self["bias"] if "bias" in self else y
            if "bias" in self:
                return mx.addmm(self["bias"], x, weight.T)
            return x @ weight.T

    return FloatKernelLinear


def main() -> int:
    """`python -m exo.inference.qkernel`: build (or find) the kernel now and say where it is."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        module = load_kernel(required=True)
    except KernelBuildError as error:
        print(f"exo's CPU kernel is not available: {error}")
        return 1
    assert module is not None
    print(f"exo's CPU kernel: {module.__file__} ({module.isa()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
