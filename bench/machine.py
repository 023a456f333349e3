"""What the suite reports about the machine it ran on, and its memory bandwidth."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_total_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def describe_machine() -> str:
    memory = memory_total_bytes() / 2**30
    return (
        f"{platform.system()} {platform.machine()}, {cpu_model()}, {len(usable_cores())} usable cores "
        f"({os.cpu_count()} online), {memory:.0f} GiB memory, host {platform.node()}"
    )


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def commit() -> str:
    """Short hash of HEAD, noting uncommitted changes in the tree (other people's work in progress)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} (working tree had uncommitted changes)" if dirty else head


def software() -> str:
    versions = []
    for package in ("mlx", "mlx-lm", "numpy", "mkl"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return f"Python {platform.python_version()}, " + ", ".join(versions)


def taskset_path() -> str | None:
    return shutil.which("taskset")


def memory_bandwidth(megabytes: int = 512, repeats: int = 5, threads: int | None = None) -> float:
    """Bytes per second moved by a large numpy copy (read + write counted), best of `repeats`.

    One copy per core in parallel (numpy releases the GIL while copying), since decoding reads
    weights with as many BLAS threads as there are cores.
    """
    workers = threads or len(usable_cores())
    per_worker = max(1, megabytes * 2**20 // workers // 4)
    sources = [np.ones(per_worker, dtype=np.float32) for _ in range(workers)]
    targets = [np.empty_like(source) for source in sources]
    for source, target in zip(sources, targets, strict=True):
        np.copyto(target, source)  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        copiers = [
            threading.Thread(target=np.copyto, args=(target, source))
            for source, target in zip(sources, targets, strict=True)
        ]
        started = time.perf_counter()
        for copier in copiers:
            copier.start()
        for copier in copiers:
            copier.join()
        best = min(best, time.perf_counter() - started)
    moved = 2 * sum(source.nbytes for source in sources)
    return moved / best
