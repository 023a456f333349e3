"""Helpers the multi-node inference tests share: the prompt, mlx-lm's reference answer, placing and
deleting instances, and killing a node while a stream is running."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, wait_until
from tests.harness.inference_helpers import tiny_models

MESSAGES = [{"role": "user", "content": "Tell me about the tide and the moon."}]
MAX_TOKENS = 24

_REFERENCE = textwrap.dedent(
    """
    import json, sys
    from exo.inference.blas import load_optimized_blas
    load_optimized_blas()
    import mlx_lm
    request = json.load(sys.stdin)
    model, tokenizer = mlx_lm.load(request["model"])
    prompt = tokenizer.apply_chat_template(request["messages"], tokenize=True, add_generation_prompt=True)
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=request["max_tokens"])
    json.dump({"text": text}, sys.stdout)
    """
)


def reference_text(model: Path) -> str:
    request = {"model": str(model), "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    completed = subprocess.run(
        [sys.executable, "-c", _REFERENCE],
        input=json.dumps(request).encode(),
        capture_output=True,
        check=True,
    )
    return str(json.loads(completed.stdout)["text"])


def chat(node: NodeProcess, model_id: str, **extra: Any) -> httpx.Response:
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    return node.post("/v1/chat/completions", body, timeout=120)


def place(node: NodeProcess, model_id: str, stages: int) -> dict[str, Any]:
    response = node.post(
        "/place_instance", {"model_id": model_id, "sharding": "Pipeline", "min_nodes": stages}
    )
    assert response.status_code == 200, response.text
    instance_id = response.json()["instance_id"]
    return wait_until(
        lambda: (i := node.get(f"/instance/{instance_id}"))["status"] == "ready" and i,
        60,
        f"{stages}-stage {model_id} ready",
    )


def delete(node: NodeProcess, instance_id: str) -> None:
    assert httpx.delete(f"{node.url}/instance/{instance_id}", timeout=30).status_code == 200


def kill_mid_stream(api_node: NodeProcess, victim: NodeProcess, model_id: str) -> None:
    """Stream a long answer from `api_node`, kill -9 `victim` after the first token: the stream must
    end with an error event within 10 s (the requester notices the dead stage, no collective hangs)."""
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": 2000, "temperature": 0, "stream": True}
    got_error = False
    with httpx.stream("POST", api_node.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        killed_at = time.monotonic()
        victim.kill(signal.SIGKILL)
        for line in lines:
            if line.startswith("data: {") and '"error"' in line:
                got_error = True
        ended_after = time.monotonic() - killed_at
    assert got_error, "the stream ended without an error event"
    assert ended_after < 10, f"the stream took {ended_after:.1f}s to end"


def re_placed_without(api_node: NodeProcess, victim: NodeProcess) -> list[dict[str, Any]]:
    """The ready instances that no longer use `victim` (the master re-placed the model without it)."""
    return wait_until(
        lambda: [
            i
            for i in api_node.state()["instances"].values()
            if i["status"] == "ready" and victim.name not in i["shard_assignments"]
        ],
        60,
        f"the instance re-placed without {victim.name}",
    )


def copy_tiny_models(root: Path) -> Path:
    """A models dir holding the tiny synthetic models as `tiny-<architecture>`."""
    for architecture, folder in tiny_models().items():
        shutil.copytree(folder, root / f"tiny-{architecture}")
    return root


@contextmanager
def agreeing_cluster(
    root: Path, size: int, models_dir: Path, env: dict[str, str] | None = None
) -> Iterator[LoopbackCluster]:
    """`size` nodes on loopback sharing `models_dir` (and `env` added to their environment, which
    their runners inherit), once they agree on a master with all alive."""
    with LoopbackCluster(root, size, ["--models-dir", str(models_dir)]) as running:
        for node in running.nodes:
            node.env.update(env or {})
        running.start_all()
        wait_until(
            lambda: (
                (s := running.converged())
                and sum(n["status"] == "alive" for n in s["nodes"].values()) == size
                and s["master_node_id"]
            ),
            90,
            f"{size} nodes agree",
        )
        yield running
