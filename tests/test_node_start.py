"""A node says where it is: one start line, then `ready: URL` once the API answers, in one log format."""

from __future__ import annotations

import logging
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from exo.node.main import quiet_transformers
from tests.harness.cluster_harness import free_port

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
DEADLINE = 90.0


def read_until_ready(process: subprocess.Popen[str], lines: list[str]) -> str:
    """Lines the node prints until its `ready:` line; that line's URL."""
    assert process.stdout is not None
    seen: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            seen.put(line.rstrip("\n"))
        seen.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            line = seen.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        lines.append(line)
        if match := re.search(r"ready: (http://\S+)$", line):
            return match.group(1)
    raise AssertionError("no `ready:` line; the node printed:\n" + "\n".join(lines))


@pytest.mark.slow
def test_the_start_command_says_where_the_node_is_and_when_it_is_ready(tmp_path: Path) -> None:
    api_port, bus_port = free_port(), free_port()
    argv = [sys.executable, "-m", "exo.node", "--node-id", "n-start", "--data-dir", str(tmp_path)]
    argv += ["--api-port", str(api_port), "--bus-port", str(bus_port), "--no-discovery"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        url = read_until_ready(process, lines)
        assert url == f"http://127.0.0.1:{api_port}"
        assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
    finally:
        process.terminate()
        process.wait(timeout=30)
    starts = [line for line in lines if "exo node n-start:" in line]
    assert len(starts) == 1, lines
    for part in (
        f"bus 127.0.0.1:{bus_port} OPEN",
        f"api {url}",
        f"data {tmp_path}",
        f"models {tmp_path / 'models'}",
        f"store sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        "BLAS ",
    ):
        assert part in starts[0], (part, starts[0])
    assert lines.index(starts[0]) < len(lines) - 1  # the start line comes before `ready:`
    assert [line for line in lines if not LOG_LINE.match(line)] == []


def test_transformers_warnings_are_silenced_and_its_errors_use_exos_format(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from transformers.utils import logging as transformers_logging

    quiet_transformers()
    library = transformers_logging.get_logger("transformers.tokenization_utils_base")
    with caplog.at_level(logging.DEBUG):
        library.warning("Token indices sequence length is longer than the specified maximum")
        library.error("a real failure")
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("transformers")]
    # Other tests may leave a capturing handler on a transformers logger: the record can arrive twice.
    assert set(messages) == {"a real failure"}
    assert transformers_logging.get_logger("transformers").propagate
