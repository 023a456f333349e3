"""Tensor instances beyond two float32 ranks, across three real node processes: three ranks equal
mlx-lm's own three-rank run; bfloat16 and 4-bit checkpoints equal mlx-lm's tensor run on the
widened weights; constrained decoding samples the same token on every rank; a SIGSTOPped rank ends
the request with a clear error within the pass bound and the instance is re-placed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import msgspec
import pytest

from exo.inference.synthetic import write_synthetic_model
from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, wait_until
from tests.harness.inference_helpers import TINY_SPECS, tiny_format_models
from tests.harness.pipeline_checks import MAX_TOKENS, agreeing_cluster, delete, place
from tests.harness.tensor_reference import mlx_lm_tensor_texts

pytestmark = pytest.mark.slow

# Heads, KV heads, hidden and intermediate all divide by 3 (not KV heads by 2: only 1 or 3 ranks).
THREE = "tiny-qwen2-r3"
THREE_SPEC = msgspec.structs.replace(
    TINY_SPECS["qwen2"], layers=4, hidden=192, intermediate=384, heads=6, kv_heads=3, seed=5
)
PASS_TIMEOUT = 5.0  # EXO_TENSOR_PASS_TIMEOUT for these nodes' runners: a tiny model's pass takes ms
PROMPTS = [
    "Tell me about the tide and the moon.",
    "Write a haiku about rust.",
    "List three colours of the sea at dusk, then explain why they change.",
]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_synthetic_model(root / THREE, THREE_SPEC)
    formats = tiny_format_models()
    for name in ("bf16", "q4"):
        shutil.copytree(formats[name], root / f"tiny-{name}")
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LoopbackCluster]:
    env = {"EXO_TENSOR_PASS_TIMEOUT": str(PASS_TIMEOUT)}
    with agreeing_cluster(tmp_path_factory.mktemp("ranks"), 3, models_dir, env) as running:
        yield running


def place_tensor(node: NodeProcess, model_id: str, min_nodes: int) -> dict[str, Any]:
    body = {"model_id": model_id, "sharding": "Tensor", "min_nodes": min_nodes}
    response = node.post("/place_instance", body)
    assert response.status_code == 200, response.text
    instance_id = response.json()["instance_id"]
    return wait_until(
        lambda: (i := node.get(f"/instance/{instance_id}"))["status"] == "ready" and i,
        90,
        f"tensor {model_id} ready",
    )


def clear(node: NodeProcess) -> None:
    for instance in node.state()["instances"].values():
        delete(node, instance["instance_id"])


def ranks_of(instance: dict[str, Any]) -> list[tuple[int, int]]:
    return sorted((a["rank"], a["size"]) for a in instance["shard_assignments"].values())


def completion(node: NodeProcess, model_id: str, **body: Any) -> dict[str, Any]:
    request = {"model": model_id, "max_tokens": MAX_TOKENS, "temperature": 0, "messages": USER, **body}
    response = node.post("/v1/chat/completions", request, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def rank_stats(cluster: LoopbackCluster, instance: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's runner stats once they all hold no request and agree on passes run and tokens
    sampled (a rank reports a beat late, so they are polled); ranks that ran different passes or
    drew different tokens never agree, and the wait fails."""
    by_name = {node.name: node for node in cluster.nodes}
    nodes = [by_name[name] for name in instance["shard_assignments"]]
    return wait_until(
        lambda: (
            (found := [n.get("/node_status")["runners"].get(instance["instance_id"]) for n in nodes])
            and all(
                r is not None and r["stats"] is not None and r["stats"]["active_requests"] == 0 for r in found
            )
            and len({(r["stats"]["tokens_sampled"], r["stats"]["steps_done"]) for r in found}) == 1
            and [r["stats"] for r in found]
        ),
        30,
        "every rank idle with the same passes run and tokens sampled",
    )


def test_three_ranks_place_and_answer_as_mlx_lm_does_on_three(
    cluster: LoopbackCluster, models_dir: Path
) -> None:
    node = cluster.nodes[0]
    clear(node)
    previews = node.get(f"/instance/previews?model_id={THREE}")
    tensor = {p["n_nodes"]: p for p in previews["previews"] if p["sharding"] == "Tensor"}
    assert "3 KV heads cannot be split evenly over 2 nodes" in json.dumps(tensor[2])
    conversations = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    expected = mlx_lm_tensor_texts(models_dir / THREE, conversations, MAX_TOKENS, ranks=3)
    assert len(set(expected)) == len(expected), "the answers should differ for the test to mean much"
    instance = place_tensor(node, THREE, 2)  # 2 cannot split the KV heads: the fewest that do is 3
    assert ranks_of(instance) == [(0, 3), (1, 3), (2, 3)]
    for api_node, messages, text in zip(cluster.nodes, conversations, expected, strict=True):
        answer = completion(api_node, THREE, messages=messages)
        assert answer["message"]["content"] == text, api_node.name
    rank_stats(cluster, instance)  # waits until every rank ran the same passes
    delete(node, instance["instance_id"])


@pytest.mark.parametrize("checkpoint", ["bf16", "q4"])
def test_bfloat16_and_4_bit_checkpoints_answer_as_mlx_lm_tensor_parallel_on_widened_weights(
    cluster: LoopbackCluster, models_dir: Path, checkpoint: str
) -> None:
    """`--weights-dtype auto` holds both as float32 on the CPU (bfloat16 widened, 4-bit layers
    dequantized with float32 scales); mlx-lm's tensor run with `set_dtype(float32)` is the same
    model, so greedy text must be equal."""
    node = cluster.nodes[1]
    clear(node)
    model_id = f"tiny-{checkpoint}"
    conversations = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    expected = mlx_lm_tensor_texts(models_dir / model_id, conversations, MAX_TOKENS, ranks=2, upcast=True)
    instance = place_tensor(node, model_id, 2)
    assert ranks_of(instance) == [(0, 2), (1, 2)]
    assert instance["weights"] == "float32"
    got = [completion(node, model_id, messages=messages)["message"]["content"] for messages in conversations]
    assert got == expected
    delete(node, instance["instance_id"])


def test_constrained_decoding_samples_the_same_token_on_every_rank(cluster: LoopbackCluster) -> None:
    """A rank that drew another token would embed it next pass and the all-reduce would mix two
    conversations: the answer would then differ from one process's. So: greedy and seeded sampling
    under a JSON schema and a forced tool call equal a one-process instance's and validate."""
    node = cluster.nodes[0]
    clear(node)
    schema = {"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": CITY}}
    tool = {"type": "function", "function": {"name": "get_weather"}}
    requests: list[dict[str, Any]] = [
        {"response_format": schema, "max_tokens": 80},
        {"response_format": schema, "max_tokens": 80, "temperature": 1.0, "seed": 11},
        {"tools": [WEATHER], "tool_choice": tool, "max_tokens": 80, "temperature": 1.0, "seed": 3},
    ]

    def answers() -> list[dict[str, Any]]:
        return [completion(node, THREE, **request) for request in requests]

    instance = place_tensor(node, THREE, 3)
    tensor = answers()
    unseeded = completion(node, THREE, response_format=schema, max_tokens=80, temperature=1.0)
    rank_stats(cluster, instance)  # waits until every rank ran the same passes
    delete(node, instance["instance_id"])
    single = place(node, THREE, 1)
    one_process = answers()
    delete(node, single["instance_id"])
    validator = jsonschema_rs.validator_for(CITY)
    for answer in [*tensor[:2], unseeded]:
        assert answer["finish_reason"] == "stop", answer
        validator.validate(json.loads(answer["message"]["content"]))
    (call,) = tensor[2]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    validator.validate(json.loads(call["function"]["arguments"]))
    assert [said(a) for a in tensor] == [said(a) for a in one_process]


def said(answer: dict[str, Any]) -> tuple[Any, ...]:
    """An answer's text and calls, without the call ids (fresh for every response)."""
    calls = answer["message"].get("tool_calls") or []
    return answer["message"]["content"], [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def process_state(pid: int, started: str | None = None) -> str:
    """The state letter /proc gives a process (T: stopped, Z: exited, unreaped), or "" if none
    (or if `started`, its start time, says the pid now belongs to another process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if started is not None and fields[19] != started else fields[0]


def start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_a_sigstopped_rank_ends_the_request_within_the_pass_bound_and_is_re_placed(
    cluster: LoopbackCluster,
) -> None:
    """MLX has no collective timeout: without the ranks' watchdog the other two would wait in an
    all_sum for ever and the stream would never end."""
    node = cluster.nodes[0]
    clear(node)
    instance = place_tensor(node, THREE, 3)
    frozen_node = next(n for n in cluster.nodes if instance["shard_assignments"][n.name]["rank"] == 1)
    frozen_pid = frozen_node.get("/node_status")["runners"][instance["instance_id"]]["pid"]
    never_ends = {"0": -100, "2": -100}  # the end-of-text tokens: the stream runs until stopped
    body = {"model": THREE, "messages": USER, "max_tokens": 3000, "stream": True, "logit_bias": never_ends}
    errors: list[str] = []
    with httpx.stream("POST", node.url + "/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        started = start_time(frozen_pid)
        os.kill(frozen_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        errors.extend(line for line in lines if line.startswith("data: {") and '"error"' in line)
        ended_after = time.monotonic() - stopped_at
    state = process_state(frozen_pid, started)
    assert state in ("T", "Z", ""), (state, errors, ended_after, frozen_node.log_tail())
    assert errors and "tensor rank stalled" in errors[0], errors
    # The bound: the pass timeout, the watchdog's check (1 s), the reports; generous for a busy VM.
    assert ended_after < PASS_TIMEOUT + 20, f"the stream took {ended_after:.1f}s to end"
    replaced = wait_until(
        lambda: [
            i
            for i in node.state()["instances"].values()
            if i["status"] == "ready" and i["instance_id"] != instance["instance_id"]
        ],
        90,
        "the tensor instance re-placed",
    )
    assert replaced[0]["sharding"] == "Tensor" and ranks_of(replaced[0]) == [(0, 3), (1, 3), (2, 3)]
    assert instance["instance_id"] not in node.state()["instances"]
    wait_until(
        lambda: process_state(frozen_pid, started) in ("Z", ""), 30, "the frozen runner killed by its worker"
    )
    answer = completion(node, THREE)
    assert answer["finish_reason"] in ("stop", "length")
