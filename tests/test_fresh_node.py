"""What the README promises: a fresh node, no models, no network, answers a chat completion at once."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.harness.cluster_harness import LoopbackCluster, wait_until

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
