"""Pipeline inference across real node processes: token-exact against mlx-lm, and failure mid-stream."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, wait_until
from tests.harness.inference_helpers import tiny_models

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for architecture, folder in tiny_models().items():
        shutil.copytree(folder, root / f"tiny-{architecture}")
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Any:
    with LoopbackCluster(
        tmp_path_factory.mktemp("pipeline"), 3, ["--models-dir", str(models_dir)]
    ) as running:
        running.start_all()
        wait_until(
            lambda: (
                (s := running.converged())
                and sum(n["status"] == "alive" for n in s["nodes"].values()) == 3
                and s["master_node_id"]
            ),
            90,
            "three nodes agree",
        )
        yield running


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


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_greedy_output_equals_mlx_lm_through_1_2_and_3_stages(
    cluster: LoopbackCluster, models_dir: Path, architecture: str
) -> None:
    model_id = f"tiny-{architecture}"
    expected = reference_text(models_dir / model_id)
    assert len(set(expected.split())) > 2, "the reference output should vary (proj_scale)"
    for stages in (1, 2, 3):
        instance = place(cluster.nodes[0], model_id, stages)
        assert len(instance["shard_assignments"]) == stages
        holders = set(instance["shard_assignments"])
        with_stage = next(node for node in cluster.nodes if node.name in holders)
        without_stage = next((node for node in cluster.nodes if node.name not in holders), None)
        for node in [with_stage, *([without_stage] if without_stage else [])]:
            response = chat(node, model_id)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["choices"][0]["message"]["content"] == expected, f"{stages} stages via {node.name}"
            assert answer["usage"]["completion_tokens"] <= MAX_TOKENS
        delete(cluster.nodes[0], instance["instance_id"])


def test_streaming_equals_non_streaming_and_stop_and_max_tokens(cluster: LoopbackCluster) -> None:
    node = cluster.nodes[1]
    plain = chat(node, "tiny-llama").json()
    text = plain["choices"][0]["message"]["content"]
    chunks: list[str] = []
    finish: str | None = None
    with httpx.stream(
        "POST",
        node.url + "/v1/chat/completions",
        json={
            "model": "tiny-llama",
            "messages": MESSAGES,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
        },
        timeout=120,
    ) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            chunks.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    assert "".join(chunks) == text
    assert finish == plain["choices"][0]["finish_reason"]
    short = chat(node, "tiny-llama", max_tokens=3).json()
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = chat(node, "tiny-llama", stop=[stop]).json()["choices"][0]
    assert stopped["message"]["content"] == text[: text.index(stop)]
    assert stopped["finish_reason"] == "stop"


def test_killing_a_stage_mid_stream_ends_the_stream_with_an_error(cluster: LoopbackCluster) -> None:
    api_node = cluster.nodes[0]
    for instance in api_node.state()["instances"].values():
        delete(api_node, instance["instance_id"])
    instance = place(api_node, "tiny-llama", 3)
    victim = next(
        node for node in cluster.nodes if node is not api_node and node.name != instance_master(api_node)
    )
    body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 2000, "temperature": 0, "stream": True}
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
    # The master re-places the model on the two survivors and it answers again.
    replaced = wait_until(
        lambda: [
            i
            for i in api_node.state()["instances"].values()
            if i["status"] == "ready" and victim.name not in i["shard_assignments"]
        ],
        60,
        "the instance re-placed on the surviving nodes",
    )
    assert instance["instance_id"] not in api_node.state()["instances"]
    assert replaced[0]["model_id"] == "tiny-llama"
    response = chat(api_node, "tiny-llama")
    assert response.status_code == 200, response.text
    victim.start()


def instance_master(node: NodeProcess) -> str:
    return str(node.state()["master_node_id"])
