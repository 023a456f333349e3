"""`exo status`: one frame against a running node, the frame's contents, and its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from exo.node.status_cli import render
from tests.harness.cluster_harness import NodeProcess, free_port, wait_until

VIEW = {
    "state": {
        "master_node_id": "a",
        "term": 4,
        "last_event_index": 12,
        "nodes": {
            "a": {"node_id": "a", "status": "alive",
                  "memory_total_bytes": 2**33, "memory_available_bytes": 2**32},
            "b": {"node_id": "b", "status": "gone",
                  "memory_total_bytes": 2**33, "memory_available_bytes": 2**33},
        },
        "instances": {
            "i-1": {"instance_id": "i-1", "model_id": "exo-tiny", "status": "ready", "shard_assignments": {
                "b": {"start_layer": 4, "end_layer": 8, "n_layers": 8},
                "a": {"start_layer": 0, "end_layer": 4, "n_layers": 8}}},
        },
    },
    "status": {"node_id": "a", "links": {"b": {"rtt_ms": 0.25}}},
    "models": {"data": [{"id": "org/m", "nodes": {
        "b": {"status": "downloading", "bytes_done": 2**29, "bytes_total": 2**30}}}]},
}  # fmt: skip


def frame_text(view: dict[str, object]) -> str:
    console = Console(width=120, record=True)
    console.print(render(view))
    return console.export_text()


def test_a_frame_shows_nodes_master_instances_and_downloads() -> None:
    text = frame_text(VIEW)
    assert "master a · term 4 · index 12" in text
    assert "a ★" in text and "gone" in text and "4.0 GiB / 8.0 GiB" in text
    assert "0.25 ms" in text and "this node" in text
    assert "a 0-4  b 4-8" in text  # pipeline order, not dict order
    assert "downloads" in text and "0.5 GiB / 1.0 GiB (50%)" in text


def test_no_downloads_table_without_downloads() -> None:
    assert "downloads" not in frame_text({**VIEW, "models": {"data": []}})


def run_status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo.node", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_once_against_a_running_node(tmp_path: Path) -> None:
    node = NodeProcess(
        "solo", tmp_path / "solo", free_port(), free_port(), peers=[], extra_args=["--api-key", "k"]
    )
    try:
        node.start()
        wait_until(lambda: node.get("/health"), 60, "the node")
        wait_until(
            lambda: run_status("--once", "--api-url", node.url, "--api-key", "k").stdout.count("solo ★"),
            30,
            "the node as master in exo status",
        )
        refused = run_status("--once", "--api-url", node.url)
        assert refused.returncode == 1 and "API key" in refused.stderr
    finally:
        node.kill()


def test_no_node_is_a_clear_error() -> None:
    result = run_status("--once", "--api-url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "no node at" in result.stderr


@pytest.mark.parametrize("interval", ["0", "-1", "nan"])
def test_a_bad_interval_is_refused(interval: str) -> None:
    result = run_status("--interval", interval)
    assert result.returncode == 2 and "--interval" in result.stderr
