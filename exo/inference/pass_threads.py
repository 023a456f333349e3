"""BLAS threads per forward pass: one thread for a batch of several requests' single-token steps.

A small GEMM on two threads costs almost twice the CPU for little or no wall time, and on a busy
machine the second thread waits for a core the node or another stage holds (figures in
docs/benchmarks-inference.md). A one-row step is a GEMV that MKL runs on one thread
anyway, and a prompt chunk (many rows) does gain from more threads, so those keep the configured
count. Switching costs one call between passes, made only when the count changes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from exo.inference.blas import BlasInfo

ThreadSetter = Callable[[int], None]


def mkl_thread_setter(blas: BlasInfo) -> ThreadSetter | None:
    """A function setting MKL's thread count, or None when this process does not use MKL."""
    if blas.library != "mkl" or blas.path is None:
        return None
    handle = ctypes.CDLL(blas.path, mode=ctypes.RTLD_GLOBAL)  # already loaded: the same library

    def set_threads(threads: int) -> None:
        handle.MKL_Set_Num_Threads(ctypes.c_int(threads))

    return set_threads


class PassThreads:
    """Decides the BLAS thread count before each pass and sets it when it changes."""

    def __init__(self, set_threads: ThreadSetter, *, default: int, batched: int) -> None:
        if default < 1 or batched < 1:
            raise ValueError("thread counts must be positive")
        self._set_threads = set_threads
        self.default = default
        self.batched = batched
        self.current = default

    def wanted(self, rows: int, tokens_per_row: int) -> int:
        return self.batched if rows > 1 and tokens_per_row == 1 else self.default

    def before_pass(self, rows: int, tokens_per_row: int) -> None:
        wanted = self.wanted(rows, tokens_per_row)
        if wanted != self.current:
            self._set_threads(wanted)
            self.current = wanted
