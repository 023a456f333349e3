"""What the README promises: a fresh node, no models, no network, answers a chat completion at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster_harness import LoopbackCluster, wait_until

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
