"""What the README promises: a fresh node, no models, no network, answers a chat completion at once."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, wait_until

pytestmark = pytest.mark.slow


def test_fresh_node_answers_chat_with_the_builtin_model(tmp_path: Path) -> None:
    with LoopbackCluster(tmp_path, 1) as cluster:
        node = cluster.nodes[0]
        node.start()
        wait_until(lambda: node.get("/health"), 60, "the API is up")
        # No waiting for the election: the node must hold the request until it can serve it.
        response = node.post(
            "/v1/chat/completions",
            {"model": "exo-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] == "exo-tiny"
        assert answer["usage"]["completion_tokens"] >= 1
        assert isinstance(answer["choices"][0]["message"]["content"], str)
        assert (node.data_dir / "models" / "exo-tiny" / "config.json").exists()
        models = node.get("/v1/models")["data"]
        assert [model["id"] for model in models] == ["exo-tiny"]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_a_restarted_node_answers_at_once_on_the_instance_it_restored(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    """The restored log says the instance is ready, at the address of a runner that died with the
    node: the request must wait for the new runner, not go to the old address."""
    request = {
        "model": "exo-tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with LoopbackCluster(tmp_path, 1) as cluster:
        node = cluster.nodes[0]
        node.start()
        wait_until(lambda: node.get("/health"), 60, "the API is up")
        first = node.post("/v1/chat/completions", request, timeout=120)
        assert first.status_code == 200, first.text
        [instance] = node.get("/state")["instances"].values()
        old_address = instance["runners"][node.name]["activation_address"]
        node.kill(stop_signal)
        node.start()
        wait_until(lambda: node.get("/health"), 60, "the API is up again")
        restored = node.get("/state")["instances"]
        assert instance["instance_id"] in restored, "the instance did not survive the restart"
        again = node.post("/v1/chat/completions", request, timeout=120)
        assert again.status_code == 200, again.text
        assert (
            again.json()["choices"][0]["message"]["content"]
            == first.json()["choices"][0]["message"]["content"]
        )
        # A kill -9 leaves the instance ready in the log: its runner is started again. A clean stop
        # reports the runner stopped first, the instance fails, and the request places a new one.
        ready = {
            instance_id: serving["runners"][node.name]["activation_address"]
            for instance_id, serving in node.get("/state")["instances"].items()
            if serving["status"] == "ready"
        }
        assert len(ready) == 1 and old_address not in ready.values(), ready
        if stop_signal == signal.SIGKILL:
            assert list(ready) == [instance["instance_id"]]


def test_after_a_full_restart_the_first_request_on_each_node_answers(tmp_path: Path) -> None:
    """Both nodes of a 2-stage instance killed and started again: the log names both previous
    runners. The first request on either node (the first stage's or the last stage's) waits for
    the new runners instead of failing on a stale address of the other node."""
    request = {
        "model": "exo-tiny",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with LoopbackCluster(tmp_path, 2) as cluster:
        cluster.start_all()
        first = cluster.nodes[0]
        wait_until(
            lambda: (
                (s := cluster.converged())
                and sum(n["status"] == "alive" for n in s["nodes"].values()) == 2
                and s["master_node_id"]
            ),
            90,
            "two nodes agree",
        )
        placed = first.post("/place_instance", {"model_id": "exo-tiny", "min_nodes": 2})
        assert placed.status_code == 200, placed.text
        instance_id = placed.json()["instance_id"]
        wait_until(lambda: first.get(f"/instance/{instance_id}")["status"] == "ready", 90, "2-stage ready")
        assert len(first.get(f"/instance/{instance_id}")["shard_assignments"]) == 2
        assert first.post("/v1/chat/completions", request, timeout=120).status_code == 200
        for node in cluster.nodes:
            node.kill(signal.SIGKILL)
        cluster.start_all()
        answers: dict[str, int | str] = {}

        def ask(node: NodeProcess) -> None:
            wait_until(lambda: node.get("/health"), 60, f"{node.name}'s API is up again")
            response = node.post("/v1/chat/completions", request, timeout=120)
            answers[node.name] = response.status_code if response.status_code == 200 else response.text

        askers = [threading.Thread(target=ask, args=(node,)) for node in cluster.nodes]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        assert answers == {node.name: 200 for node in cluster.nodes}
