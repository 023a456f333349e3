"""exo/inference/heap.py: a runner hands freed buffers back (MLX cache limit, glibc threshold)."""

from __future__ import annotations

import sys

import mlx.core as mx
import pytest

from exo.inference import heap


class FakeLibc:
    def __init__(self, result: int) -> None:
        self.result = result
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_the_threshold_is_fixed_at_128_kib() -> None:
    libc = FakeLibc(1)
    assert heap.fix_mmap_threshold(libc)
    assert libc.calls == [(-3, 128 * 1024)]  # M_MMAP_THRESHOLD in glibc's malloc.h


def test_a_refused_mallopt_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    assert not heap.fix_mmap_threshold(FakeLibc(0))
    assert "mallopt(M_MMAP_THRESHOLD) failed" in caplog.text


def test_a_c_library_without_mallopt_changes_nothing() -> None:
    assert not heap.fix_mmap_threshold(object())  # pyright: ignore[reportArgumentType]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_accepts_it() -> None:
    assert heap.fix_mmap_threshold()


def test_a_runner_keeps_no_freed_mlx_buffers() -> None:
    previous = mx.set_cache_limit(1 << 30)
    try:
        heap.release_freed_buffers()
        assert mx.set_cache_limit(1 << 30) == 0
    finally:
        mx.set_cache_limit(previous)
