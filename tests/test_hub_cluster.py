"""Hub models in a real cluster: fetch, place with per-stage files, chat, delete, and the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, wait_until
from tests.harness.hub_fixtures import publish
from tests.harness.local_hub import LocalHub

pytestmark = pytest.mark.slow

REPO = "test-org/tiny-4"
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    root = tmp_path / "hub"
    publish(root, REPO)
    publish(root, "test-org/gated")
    with LocalHub(root, gated={"test-org/gated": "secret-token"}) as server:
        yield server


def _cluster(tmp_path: Path, hub: LocalHub, size: int) -> LoopbackCluster:
    cluster = LoopbackCluster(tmp_path / "cluster", size)
    for node in cluster.nodes:
        node.env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": ""}
    return cluster


def _models(node: NodeProcess) -> dict[str, Any]:
    return {model["id"]: model for model in node.get("/models")["data"]}


def _node_state(node: NodeProcess, model_id: str, node_id: str) -> dict[str, Any] | None:
    return _models(node).get(model_id, {}).get("nodes", {}).get(node_id)


def _weights(node: NodeProcess) -> set[str]:
    folder = node.data_dir / "models" / REPO
    return {path.name for path in folder.glob("*.safetensors")} if folder.is_dir() else set()


def test_pull_place_on_two_stages_chat_and_delete(tmp_path: Path, hub: LocalHub) -> None:
    with _cluster(tmp_path, hub, 2) as cluster:
        cluster.start_all()
        first, second = cluster.nodes
        wait_until(lambda: all(len(node.state()["nodes"]) == 2 for node in cluster.nodes), 90, "two nodes")

        # Not fetched yet: a chat says how to fetch it, and nothing is downloaded.
        refused = first.post("/v1/chat/completions", {"model": REPO, **CHAT})
        assert refused.status_code == 404, refused.text
        error = refused.json()["error"]
        assert error["code"] == "model_not_found" and f"exo models pull {REPO}" in error["message"]
        assert hub.stats.bytes_served == 0

        accepted = first.post("/models/download", {"model_id": REPO, "node_ids": ["node0"]})
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["node_ids"] == ["node0"]
        wait_until(
            lambda: (_node_state(second, REPO, "node0") or {}).get("status") == "ready", 60, "node0 ready"
        )
        assert _weights(first) == {f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)}
        # The models dir is listed at most every 2 s.
        wait_until(lambda: REPO in [model["id"] for model in first.get("/v1/models")["data"]], 10, "listed")
        assert first.get(f"/v1/models/{REPO}")["id"] == REPO
        assert f"{REPO}:latest" in [model["name"] for model in first.get("/ollama/api/tags")["models"]]
        download = first.state()["downloads"]["node0"][REPO]
        assert download["status"] == "ready" and download["bytes_total"] > 0
        events = [event["event"]["type"] for event in first.get("/events?limit=1000")]
        assert "ModelDownloadStarted" in events and "ModelDownloadFinished" in events

        # Two stages: node1 fetches only the weight files of its layers, from node0, not the Hub.
        assert all(hub.stats.whole_files[f"{REPO}/{name}"] == 1 for name in _weights(first))
        placed = second.post("/place_instance", {"model_id": REPO, "min_nodes": 2}, timeout=60)
        assert placed.status_code == 200, placed.text
        instance_id = placed.json()["instance_id"]
        wait_until(
            lambda: first.get(f"/instance/{instance_id}")["status"] == "ready", 120, "the instance is ready"
        )
        assignments = first.get(f"/instance/{instance_id}")["shard_assignments"]
        assert set(assignments) == {"node0", "node1"}
        stage = assignments["node1"]
        expected = {
            f"model-0000{part + 1}-of-00004.safetensors"
            for layer in range(stage["start_layer"], stage["end_layer"])
            for part in [layer * 4 // 4]
        }
        held = _weights(second)
        assert expected <= held and len(held) < 4, (stage, held)
        assert all(hub.stats.whole_files[f"{REPO}/{name}"] == 1 for name in held), hub.stats.whole_files
        assert second.get("/node_status")["peer_bytes_fetched"] > 0
        # node1 had the model's description from node0 too: the Hub's metadata was read once.
        assert sum(request.startswith(f"GET /api/models/{REPO}") for request in hub.stats.requests) == 1
        assert first.get("/node_status")["peer_bytes_served"] > 0
        answer = second.post("/v1/chat/completions", {"model": REPO, **CHAT}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == REPO

        # Deleting is refused while an instance uses the model, then removes it everywhere.
        busy = httpx.delete(f"{first.url}/models/{REPO}", timeout=30)
        assert busy.status_code == 409 and "in use" in busy.json()["error"]["message"]
        assert httpx.delete(f"{first.url}/instance/{instance_id}", timeout=30).status_code == 200
        deleted = httpx.delete(f"{first.url}/models/{REPO}", timeout=60)
        assert deleted.status_code == 200, deleted.text
        assert sorted(deleted.json()["node_ids"]) == ["node0", "node1"]
        assert _weights(first) == set() and _weights(second) == set()
        wait_until(
            lambda: REPO not in [model["id"] for model in first.get("/v1/models")["data"]], 10, "unlisted"
        )


def test_hub_errors_reach_the_client(tmp_path: Path, hub: LocalHub) -> None:
    with _cluster(tmp_path, hub, 1) as cluster:
        cluster.start_all()
        [node] = cluster.nodes
        wait_until(lambda: node.state()["nodes"], 90, "the node joined")
        gated = node.post("/models/download", {"model_id": "test-org/gated"})
        assert gated.status_code == 403, gated.text
        assert "HF_TOKEN" in gated.json()["error"]["message"]
        missing = node.post("/models/download", {"model_id": "test-org/absent"})
        assert missing.status_code == 404 and "no model 'test-org/absent'" in missing.text
        bad = node.post("/models/download", {"model_id": "exo-tiny"})
        assert bad.status_code == 400, bad.text
        # Ollama's pull streams progress lines in its own shape, ending with success.
        with httpx.stream("POST", f"{node.url}/ollama/api/pull", json={"model": REPO}, timeout=120) as stream:
            lines = [json.loads(line) for line in stream.iter_lines() if line]
        assert lines[0] == {"status": "pulling manifest"}
        assert lines[-1] == {"status": "success"}
        sized = [line for line in lines if "total" in line]
        assert sized and sized[-1]["completed"] == sized[-1]["total"] > 0
        assert (node.data_dir / "models" / REPO / "config.json").is_file()
        assert not (node.data_dir / "models" / ".downloads" / REPO).exists()
        # The CLI talks to the running node.
        cli = [sys.executable, "-m", "exo.node", "models", "--api-url", node.url]
        listed = subprocess.run([*cli, "list"], capture_output=True, text=True, timeout=60, check=True)
        assert REPO in listed.stdout and "node0: ready" in listed.stdout
        removed = subprocess.run([*cli, "rm", REPO], capture_output=True, text=True, timeout=60, check=True)
        assert "deleted test-org/tiny-4 from node0" in removed.stdout
        assert not (node.data_dir / "models" / REPO).exists()
        pulled = subprocess.run(
            [*cli, "pull", REPO], capture_output=True, text=True, timeout=120, check=False
        )
        assert pulled.returncode == 0, pulled.stderr
        assert "ready on node0" in pulled.stdout


def test_auto_download_fetches_on_the_first_chat(tmp_path: Path, hub: LocalHub) -> None:
    with _cluster(tmp_path, hub, 1) as cluster:
        [node] = cluster.nodes
        node.extra_args = ["--auto-download"]
        node.start()
        wait_until(lambda: node.state()["nodes"], 90, "the node joined")
        answer = node.post("/v1/chat/completions", {"model": REPO, **CHAT}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert hub.stats.bytes_served >= hub.model_size(REPO) - 100_000


def test_with_a_cluster_secret_a_node_fetches_from_its_peer_not_the_hub(
    tmp_path: Path, hub: LocalHub
) -> None:
    with _cluster(tmp_path, hub, 2) as cluster:
        for node in cluster.nodes:
            node.extra_args = ["--cluster-secret", "hub-test-secret"]
        cluster.start_all()
        first, second = cluster.nodes
        wait_until(lambda: all(len(node.state()["nodes"]) == 2 for node in cluster.nodes), 90, "two nodes")
        assert first.post("/models/download", {"model_id": REPO, "node_ids": ["node0"]}).status_code == 202
        wait_until(
            lambda: (_node_state(first, REPO, "node0") or {}).get("status") == "ready", 60, "node0 ready"
        )
        assert second.post("/models/download", {"model_id": REPO, "node_ids": ["node1"]}).status_code == 202
        wait_until(
            lambda: (_node_state(first, REPO, "node1") or {}).get("status") == "ready", 60, "node1 ready"
        )
        assert _weights(second) == _weights(first) and len(_weights(second)) == 4
        weights = {
            name: count for name, count in hub.stats.whole_files.items() if name.endswith(".safetensors")
        }
        assert len(weights) == 4 and all(count == 1 for count in weights.values()), weights
        # config.json too: read once for the metadata, then written from that description.
        assert hub.stats.whole_files[f"{REPO}/config.json"] == 1, hub.stats.whole_files
        assert second.get("/node_status")["peer_bytes_fetched"] >= hub.model_size(REPO) // 2


def _weight_bytes_downloaded(hub: LocalHub) -> int:
    """Weight bytes the Hub served as downloads (the metadata's header reads left out)."""
    served = sum(count for name, count in hub.stats.bytes_by_file.items() if name.endswith(".safetensors"))
    return served - hub.stats.header_bytes


def _weights_size(hub: LocalHub) -> int:
    return sum(each.size for path, each in hub.files(REPO).items() if path.endswith(".safetensors"))


def _only_verified_files_in_place(node: NodeProcess, hub: LocalHub) -> None:
    """Where the model is expected there is nothing half-written: every file is the Hub's."""
    folder = node.data_dir / "models" / REPO
    source = hub.repo_dir(REPO)
    assert source is not None
    for path in folder.rglob("*") if folder.is_dir() else []:
        if path.is_file() and not path.name.startswith(".exo-hub.json"):  # the manifest (and its tmp)
            assert path.read_bytes() == (source / path.relative_to(folder)).read_bytes(), path


def _read_metadata(node: NodeProcess, hub: LocalHub) -> None:
    """Have `node` read the model's Hub metadata (through the previews, which fetch no weights:
    only the safetensors headers, by range)."""
    previews = node.get(f"/instance/previews?model_id={REPO}", timeout=30)["previews"]
    assert previews[0]["placement"] is not None
    assert not [name for name in hub.stats.whole_files if name.endswith(".safetensors")]


def test_nodes_fetching_the_same_model_at_once_take_each_file_from_the_hub_once(
    tmp_path: Path, hub: LocalHub
) -> None:
    """One download per cluster: three nodes asked for the model at the same moment (none holds
    it) fetch each file from the Hub once; the node that started first fetches, the others copy."""
    with _cluster(tmp_path, hub, 3) as cluster:
        cluster.start_all()
        first = cluster.nodes[0]
        wait_until(lambda: all(len(node.state()["nodes"]) == 3 for node in cluster.nodes), 90, "three nodes")
        _read_metadata(first, hub)
        hub.throttle_bytes_per_second = 150_000  # the downloads overlap: each file takes a second or two
        names = [node.name for node in cluster.nodes]
        accepted = first.post("/models/download", {"model_id": REPO, "node_ids": names})
        assert accepted.status_code == 202, accepted.text
        wait_until(
            lambda: all((_node_state(first, REPO, name) or {}).get("status") == "ready" for name in names),
            120,
            "every node ready",
        )
        for node in cluster.nodes:
            assert len(_weights(node)) == 4
            _only_verified_files_in_place(node, hub)
        weights = {
            name: count for name, count in hub.stats.whole_files.items() if name.endswith(".safetensors")
        }
        assert len(weights) == 4 and all(count == 1 for count in weights.values()), weights
        # The hub counts a body once its (throttled) send loop ends, a moment after the client has it.
        wait_until(lambda: _weight_bytes_downloaded(hub) >= _weights_size(hub), 10, "the hub's counts")
        assert _weight_bytes_downloaded(hub) == _weights_size(hub)
        copied = sum(node.get("/node_status")["peer_bytes_fetched"] for node in cluster.nodes)
        assert copied >= 2 * _weights_size(hub)


def test_a_node_killed_mid_download_resumes_from_its_bytes_after_a_restart(
    tmp_path: Path, hub: LocalHub
) -> None:
    with _cluster(tmp_path, hub, 2) as cluster:
        cluster.start_all()
        first, second = cluster.nodes
        wait_until(lambda: all(len(node.state()["nodes"]) == 2 for node in cluster.nodes), 90, "two nodes")
        _read_metadata(first, hub)
        hub.throttle_bytes_per_second = 40_000
        accepted = first.post("/models/download", {"model_id": REPO, "node_ids": [second.name]})
        assert accepted.status_code == 202, accepted.text
        staging = second.data_dir / "models" / ".downloads" / REPO
        folder = second.data_dir / "models" / REPO

        def complete_on_disk() -> set[str]:
            """Weight files node1 has whole: verified in place, or staged (huggingface_hub
            writes a file in 10 MB chunks, so these small files' part files stay empty)."""
            staged = {path.name for path in staging.glob("*.safetensors") if path.is_file()}
            return staged | _weights(second)

        wait_until(lambda: len(complete_on_disk()) >= 1, 60, "node1 part way through")
        second.kill()  # SIGKILL, mid-download
        assert not (folder / "config.json").exists()
        _only_verified_files_in_place(second, hub)
        kept = complete_on_disk()
        assert 1 <= len(kept) < 4, kept
        hub.throttle_bytes_per_second = None
        second.start()
        wait_until(
            lambda: (_node_state(first, REPO, second.name) or {}).get("status") == "ready", 90, "node1 ready"
        )
        _only_verified_files_in_place(second, hub)
        assert len(_weights(second)) == 4
        assert not list(folder.glob(".exo-hub.json.tmp-*"))  # nor a manifest write the kill cut short
        # The restart fetched only what it did not have: the files it had were not fetched again.
        fetched = {name.rsplit("/", 1)[1]: count for name, count in hub.stats.whole_files.items()}
        assert all(fetched[name] == 1 for name in kept), (kept, fetched)
        assert not staging.exists()
        # And the node serves its share of an instance.
        placed = first.post("/place_instance", {"model_id": REPO, "min_nodes": 2}, timeout=60)
        assert placed.status_code == 200, placed.text
        instance_id = placed.json()["instance_id"]
        wait_until(lambda: first.get(f"/instance/{instance_id}")["status"] == "ready", 120, "instance ready")
        answer = first.post("/v1/chat/completions", {"model": REPO, **CHAT}, timeout=120)
        assert answer.status_code == 200, answer.text


def test_the_node_fetching_for_the_cluster_dies_and_the_others_fetch_from_the_hub(
    tmp_path: Path, hub: LocalHub
) -> None:
    """A real peer dies mid-download: the node that was copying from it fetches the rest (and
    resumes any part it had) from the Hub, and holds only verified files."""
    with _cluster(tmp_path, hub, 3) as cluster:
        cluster.start_all()
        entry = cluster.nodes[0]
        wait_until(lambda: all(len(node.state()["nodes"]) == 3 for node in cluster.nodes), 90, "three nodes")
        _read_metadata(entry, hub)
        hub.throttle_bytes_per_second = 30_000
        asked = [node.name for node in cluster.nodes[1:]]
        assert entry.post("/models/download", {"model_id": REPO, "node_ids": asked}).status_code == 202

        def started() -> list[str]:
            downloads = entry.state()["downloads"]
            records = [(downloads.get(name, {}).get(REPO, {}), name) for name in asked]
            if not all(record.get("status") == "downloading" for record, _name in records):
                return []
            return [name for _record, name in sorted(records, key=lambda pair: pair[0]["since"])]

        fetching, copying = wait_until(started, 60, "both downloads started")
        dying = next(node for node in cluster.nodes if node.name == fetching)
        survivor = next(node for node in cluster.nodes if node.name == copying)
        wait_until(
            lambda: survivor.get("/node_status")["peer_bytes_fetched"] > 0, 60, "copying from the peer"
        )
        dying.kill()
        wait_until(
            lambda: (_node_state(entry, REPO, copying) or {}).get("status") == "ready", 120, "survivor ready"
        )
        _only_verified_files_in_place(survivor, hub)
        assert len(_weights(survivor)) == 4
        # What the dead node had fetched for the cluster is fetched again by the survivor, once.
        assert _weight_bytes_downloaded(hub) <= 2 * _weights_size(hub)
        weights = {
            name: count for name, count in hub.stats.whole_files.items() if name.endswith(".safetensors")
        }
        assert all(count <= 2 for count in weights.values()), weights


def test_an_instance_whose_node_is_killed_mid_download_recovers(tmp_path: Path, hub: LocalHub) -> None:
    """A 2-stage instance of a Hub model; its second node is SIGKILLed while fetching its stage.
    Nothing half-written is left where the model is expected; once the node is back the
    instance is re-placed, the node resumes from the bytes it had, and the model answers."""
    with _cluster(tmp_path, hub, 2) as cluster:
        cluster.start_all()
        first, second = cluster.nodes
        wait_until(lambda: all(len(node.state()["nodes"]) == 2 for node in cluster.nodes), 90, "two nodes")
        _read_metadata(first, hub)
        hub.throttle_bytes_per_second = 30_000
        placed = first.post("/place_instance", {"model_id": REPO, "min_nodes": 2}, timeout=60)
        assert placed.status_code == 200, placed.text
        stage = placed.json()["shard_assignments"]["node1"]
        # One layer per weight file here: node1's stage is these files (huggingface_hub writes a
        # file's bytes in 10 MB chunks, so a small file is on disk whole or not at all).
        stage_files = [
            f"model-0000{layer + 1}-of-00004.safetensors"
            for layer in range(stage["start_layer"], stage["end_layer"])
        ]
        assert len(stage_files) >= 2, stage

        def mid_download() -> bool:
            return 0 < len(_weights(second) & set(stage_files)) < len(stage_files)

        wait_until(mid_download, 60, "node1 holding part of its stage")
        second.kill()
        folder = second.data_dir / "models" / REPO
        verified = {
            name: ((folder / name).stat().st_ino, (folder / name).stat().st_mtime_ns)
            for name in _weights(second) & set(stage_files)
        }
        assert verified, "node1 held no verified file of its stage when killed"
        assert not (second.data_dir / "models" / REPO / "config.json").exists()
        _only_verified_files_in_place(second, hub)
        hub.throttle_bytes_per_second = None
        second.start()

        def ready_instance() -> str | None:
            instances = first.state()["instances"].values()
            ready = [each for each in instances if each["model_id"] == REPO and each["status"] == "ready"]
            return ready[0]["instance_id"] if ready else None

        instance_id = wait_until(ready_instance, 180, "a ready instance of the model")
        assert set(first.get(f"/instance/{instance_id}")["shard_assignments"]) == {"node0", "node1"}
        answer = second.post("/v1/chat/completions", {"model": REPO, **CHAT}, timeout=120)
        assert answer.status_code == 200, answer.text
        _only_verified_files_in_place(second, hub)
        # What node1 had verified before the kill is kept as it was (the re-placement may give it
        # other layers, so the Hub's counts alone cannot tell); what was in flight was fetched again.
        for name, identity in verified.items():
            stat = (folder / name).stat()
            assert (stat.st_ino, stat.st_mtime_ns) == identity, f"{name} was written again"
        fetched = {name.rsplit("/", 1)[1]: count for name, count in hub.stats.whole_files.items()}
        assert all(fetched[name] <= 2 for name in stage_files), fetched
