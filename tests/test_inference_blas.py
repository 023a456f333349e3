"""The BLAS choice, seen from /proc/self/maps of a fresh process (the choice is per process)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import json
from exo.inference.blas import load_optimized_blas, check_blas
info = load_optimized_blas(threads=1)
check = check_blas(matrix_size=128, repeats=1)
again = load_optimized_blas(threads=2)  # a second call resizes the thread pool of the loaded library
print(json.dumps({"info": info.library, "threads": info.threads, "seen": check.library,
                  "paths": check.loaded_paths, "gflops": check.gflops, "threads_again": again.threads}))
"""


def probe(**environment: str) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **environment},
        capture_output=True,
        check=True,
        timeout=60,
    )
    return json.loads(completed.stdout)


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="MKL is only loaded on Linux x86_64"
)
def test_mkl_is_mapped_after_loading_and_not_when_turned_off() -> None:
    optimized = probe(EXO_BLAS="")
    assert optimized["info"] == optimized["seen"] == "mkl"
    assert optimized["threads"] == 1
    assert optimized["threads_again"] == 2
    assert any("libmkl_rt" in path for path in optimized["paths"])  # type: ignore[union-attr]
    reference = probe(EXO_BLAS="reference")
    assert reference["info"] == reference["seen"] == "reference"
    assert not any("libmkl" in path for path in reference["paths"])  # type: ignore[union-attr]
    assert isinstance(optimized["gflops"], float) and optimized["gflops"] > 0


def test_loading_after_mlx_warns_instead_of_pretending() -> None:
    script = (
        "import warnings, mlx.core\n"
        "from exo.inference.blas import load_optimized_blas\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    info = load_optimized_blas()\n"
        "print(info.reason, '|', caught[0].message if caught else 'no warning')\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "EXO_BLAS"}
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        check=True,
        timeout=60,
        text=True,
    )
    assert "mlx was imported before" in completed.stdout
    assert "no warning" not in completed.stdout
