"""Tensor-parallel instances across real node processes: every rank holds half of every layer,
greedy output equals mlx-lm's single process, streaming, cancellation and kill -9 of a rank."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, wait_until
from tests.harness.pipeline_checks import (
    MAX_TOKENS,
    MESSAGES,
    agreeing_cluster,
    chat,
    copy_tiny_models,
    delete,
    kill_mid_stream,
    place,
    re_placed_without,
    reference_text,
)
from tests.harness.tensor_reference import mlx_lm_tensor_texts

PROMPTS = [
    "Tell me about the tide and the moon.",
    "Write a haiku about rust.",
    "What is two plus two?",
    "List three colours of the sea at dusk, then explain why they change.",
]
# float32 everywhere: a sum split over two ranks and all-reduced rounds differently from one sum.
LOGPROB_TOLERANCE = 1e-4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LoopbackCluster]:
    with agreeing_cluster(tmp_path_factory.mktemp("tensor"), 2, models_dir) as running:
        yield running


def place_tensor(node: NodeProcess, model_id: str, ranks: int) -> dict[str, Any]:
    response = node.post("/place_instance", {"model_id": model_id, "sharding": "Tensor", "min_nodes": ranks})
    assert response.status_code == 200, response.text
    instance_id = response.json()["instance_id"]
    return wait_until(
        lambda: (i := node.get(f"/instance/{instance_id}"))["status"] == "ready" and i,
        60,
        f"{ranks}-rank tensor {model_id} ready",
    )


def clear(node: NodeProcess) -> None:
    for instance in node.state()["instances"].values():
        delete(node, instance["instance_id"])


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_two_ranks_answer_as_mlx_lm_does_through_either_node(
    cluster: LoopbackCluster, models_dir: Path, architecture: str
) -> None:
    clear(cluster.nodes[0])
    model_id = f"tiny-{architecture}"
    expected = reference_text(models_dir / model_id)
    instance = place_tensor(cluster.nodes[0], model_id, 2)
    assert instance["sharding"] == "Tensor"
    assignments = instance["shard_assignments"].values()
    n_layers = next(iter(assignments))["n_layers"]
    got = sorted((a["rank"], a["size"], a["start_layer"], a["end_layer"]) for a in assignments)
    assert got == [(0, 2, 0, n_layers), (1, 2, 0, n_layers)]
    for node in cluster.nodes:
        response = chat(node, model_id)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected, node.name
    delete(cluster.nodes[0], instance["instance_id"])


def test_same_tokens_as_mlx_lm_tensor_parallel_and_logprobs_within_tolerance_of_one_process(
    cluster: LoopbackCluster, models_dir: Path
) -> None:
    node = cluster.nodes[0]
    clear(node)
    conversations = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    expected = mlx_lm_tensor_texts(models_dir / "tiny-llama", conversations, MAX_TOKENS, ranks=2)

    def answers() -> list[dict[str, Any]]:
        out = []
        for messages in conversations:
            response = chat(node, "tiny-llama", messages=messages, logprobs=True)
            assert response.status_code == 200, response.text
            out.append(response.json()["choices"][0])
        return out

    tensor = place_tensor(node, "tiny-llama", 2)
    tensor_answers = answers()
    assert [answer["message"]["content"] for answer in tensor_answers] == expected
    delete(node, tensor["instance_id"])
    single = place(node, "tiny-llama", 1)
    single_answers = answers()
    delete(node, single["instance_id"])
    for tensor_answer, single_answer in zip(tensor_answers, single_answers, strict=True):
        tensor_tokens = tensor_answer["logprobs"]["content"]
        single_tokens = single_answer["logprobs"]["content"]
        assert [t["token"] for t in tensor_tokens] == [t["token"] for t in single_tokens]
        worst = max(
            abs(t["logprob"] - s["logprob"]) for t, s in zip(tensor_tokens, single_tokens, strict=True)
        )
        assert worst <= LOGPROB_TOLERANCE, f"logprobs differ by {worst}"


def test_streaming_concurrent_streams_sampling_and_cancellation(cluster: LoopbackCluster) -> None:
    node = cluster.nodes[1]
    clear(node)
    instance_id = place_tensor(node, "tiny-llama", 2)["instance_id"]
    text = chat(node, "tiny-llama").json()["choices"][0]["message"]["content"]
    chunks: list[str] = []
    body = {
        "model": "tiny-llama",
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    assert "".join(chunks) == text
    # Random sampling without a seed: rank 0 gives the request a seed, so the ranks stay in step.
    sampled = [chat(node, "tiny-llama", temperature=1.0) for _ in range(3)]
    assert all(response.status_code == 200 for response in sampled), [r.text for r in sampled]
    # A client that goes away mid-stream: every rank frees the request and the next one works.
    long = {**body, "max_tokens": 2000}
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=long, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break
    again = chat(node, "tiny-llama")
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == text
    # This instance's ranks only: a runner of an instance an earlier test deleted may still be
    # stopping on a node, with its own counters.
    ranks = wait_until(
        lambda: (
            (found := [n.get("/node_status")["runners"].get(instance_id) for n in cluster.nodes])
            and all(
                r is not None and r["stats"] is not None and r["stats"]["active_requests"] == 0 for r in found
            )
            and found
        ),
        30,
        "every rank freed the abandoned request",
    )
    steps = {rank["stats"]["steps_done"] for rank in ranks if rank is not None}
    assert len(steps) == 1, f"the ranks ran different numbers of passes: {steps}"


def test_killing_a_rank_mid_stream_fails_the_request_fast_and_re_places(cluster: LoopbackCluster) -> None:
    api_node, victim = cluster.nodes
    clear(api_node)
    instance = place_tensor(api_node, "tiny-llama", 2)
    kill_mid_stream(api_node, victim, "tiny-llama")
    # Two nodes less one is no majority: nothing is committed (no re-placement) until the operator
    # removes the dead member (`exo cluster remove`, refused while it still answers).
    wait_until(
        lambda: httpx.delete(f"{api_node.url}/node/{victim.name}", timeout=10).status_code == 200,
        30,
        f"{victim.name} removed once silent",
    )
    # The survivor's rank left its runner (no hang in a collective) and the model is re-placed there.
    replaced = re_placed_without(api_node, victim)
    assert instance["instance_id"] not in api_node.state()["instances"]
    assert replaced[0]["sharding"] == "Tensor"
    response = chat(api_node, "tiny-llama")
    assert response.status_code == 200, response.text
    victim.start()
