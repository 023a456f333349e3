"""Three real node processes on loopback: election, failover, restart, replay equality."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, free_port, wait_until

pytestmark = pytest.mark.slow

AGREE_SECONDS = 5.0
# Interpreter, MLX and tokenizer imports on a loaded 2-core CI machine: not what these tests measure.
STARTUP_SECONDS = 90.0


def master_of(cluster: LoopbackCluster, nodes: list[NodeProcess]) -> str | None:
    state = cluster.converged(nodes)
    if state is None or state["master_node_id"] is None:
        return None
    return state["master_node_id"]


def all_events(node: NodeProcess) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        page = node.get(f"/events?since={len(events)}&limit=1000")
        if not page:
            return events
        events.extend(page)


def replay_json(data_dir: Path, until: int) -> bytes:
    result = subprocess.run(
        [sys.executable, "-m", "exo.replay", str(data_dir / "events.db"), "--json", "--until", str(until)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return result.stdout


def served_state(node: NodeProcess) -> tuple[int, bytes]:
    """GET /state's bytes as served, with the index they are at."""
    response = httpx.get(node.url + "/state", timeout=2.0)
    response.raise_for_status()
    return json.loads(response.content)["last_event_index"], response.content


def test_three_nodes_elect_one_master_and_agree(tmp_path: Path) -> None:
    with LoopbackCluster(tmp_path, 3) as cluster:
        cluster.start_all()
        wait_until(lambda: all(n.get("/health") for n in cluster.nodes), STARTUP_SECONDS, "APIs up")
        # The 5 s budget starts once the processes serve (interpreter start-up is not the cluster's).
        state = wait_until(
            lambda: (
                (s := cluster.converged()) is not None
                and s["master_node_id"] is not None
                and len([n for n in s["nodes"].values() if n["status"] == "alive"]) == 3
                and s
            ),
            AGREE_SECONDS,
            "one master, three alive nodes, identical state",
        )
        assert state["master_node_id"] in {"node0", "node1", "node2"}
        assert state["term"] >= 1
        assert {n["node_id"] for n in state["nodes"].values()} == {"node0", "node1", "node2"}
        statuses = [n.get("/node_status") for n in cluster.nodes]
        assert sum(1 for s in statuses if s["is_master"]) == 1


def test_a_forced_master_joining_later_takes_over_without_losing_events(tmp_path: Path) -> None:
    with LoopbackCluster(tmp_path, 2) as cluster:
        cluster.start_all()
        wait_until(lambda: all(n.get("/health") for n in cluster.nodes), STARTUP_SECONDS, "APIs up")
        first = wait_until(lambda: master_of(cluster, cluster.nodes), STARTUP_SECONDS, "a first master")
        before = cluster.states()[0]
        forced = NodeProcess(
            name="forced",
            data_dir=tmp_path / "forced",
            bus_port=free_port(),
            api_port=free_port(),
            peers=[f"127.0.0.1:{node.bus_port}" for node in cluster.nodes],
            extra_args=["--force-master"],
        )
        cluster.nodes.append(forced)  # killed with the others
        forced.start()
        state = wait_until(
            lambda: (s := cluster.converged()) and s["master_node_id"] == "forced" and s,
            STARTUP_SECONDS,
            "the forced node to lead all three",
        )
        assert first != "forced" and state["term"] > before["term"]
        for node in cluster.nodes:
            events = all_events(node)
            assert [event["index"] for event in events] == list(range(1, len(events) + 1))
            assert (
                events[: before["last_event_index"]]
                == all_events(cluster.nodes[0])[: before["last_event_index"]]
            )


def test_master_kill_failover_no_gap_and_rejoin(tmp_path: Path) -> None:
    with LoopbackCluster(tmp_path, 3) as cluster:
        cluster.start_all()
        wait_until(lambda: all(n.get("/health") for n in cluster.nodes), STARTUP_SECONDS, "APIs up")
        first_master = wait_until(
            lambda: (
                (s := cluster.converged())
                and len([n for n in s["nodes"].values() if n["status"] == "alive"]) == 3
                and s["master_node_id"]
            ),
            AGREE_SECONDS,
            "first master",
        )
        before = cluster.states()[0]
        dead = next(node for node in cluster.nodes if node.name == first_master)
        survivors = [node for node in cluster.nodes if node is not dead]
        dead.kill(signal.SIGKILL)

        def new_master_agreed() -> dict[str, Any] | None:
            state = cluster.converged(survivors)
            if state is None or state["master_node_id"] in (None, first_master):
                return None
            return state if state["nodes"][first_master]["status"] == "gone" else None

        after = wait_until(new_master_agreed, AGREE_SECONDS, "a new master and the dead node marked gone")
        assert after["term"] > before["term"]
        assert after["last_event_index"] > before["last_event_index"]
        for node in survivors:
            indices = [event["index"] for event in all_events(node)]
            assert indices == list(range(1, len(indices) + 1)), f"{node.name} log has a gap or duplicate"
        assert all_events(survivors[0]) == all_events(survivors[1])
        for node in cluster.nodes:  # the dead node's log too: a kill -9 leaves it valid
            verified = subprocess.run(
                [sys.executable, "-m", "exo.replay", str(node.data_dir / "events.db"), "--verify"],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert verified.returncode == 0, verified.stdout + verified.stderr

        dead.start()
        rejoined = wait_until(
            lambda: (
                (s := cluster.converged(cluster.nodes))
                and s["nodes"][first_master]["status"] == "alive"
                and s
            ),
            STARTUP_SECONDS,
            "the restarted node rejoined and caught up",
        )
        assert rejoined["master_node_id"] == after["master_node_id"]
        logs = [all_events(node) for node in cluster.nodes]
        assert logs[0] == logs[1] == logs[2]


def test_full_restart_restores_state_and_replay_matches(tmp_path: Path) -> None:
    served: dict[str, dict[int, bytes]] = {}
    with LoopbackCluster(tmp_path, 3) as cluster:
        cluster.start_all()
        state = wait_until(
            lambda: (
                (s := cluster.converged())
                and len([n for n in s["nodes"].values() if n["status"] == "alive"]) == 3
                and s
            ),
            STARTUP_SECONDS,
            "cluster formed",
        )
        for node in cluster.nodes:
            index, document = served_state(node)
            served.setdefault(node.name, {})[index] = document
        for node in cluster.nodes:
            node.stop()
        for node in cluster.nodes:
            node.start()
        restored = wait_until(
            lambda: (
                (s := cluster.converged())
                and s["last_event_index"] >= state["last_event_index"]
                and len([n for n in s["nodes"].values() if n["status"] == "alive"]) == 3
                and s
            ),
            STARTUP_SECONDS,
            "cluster back after a full restart",
        )
        # Nothing was lost: every instance and node is still there, and the log only grew.
        assert set(restored["nodes"]) == set(state["nodes"])
        assert restored["term"] >= state["term"]
        for node in cluster.nodes:
            index, document = served_state(node)
            served[node.name][index] = document
        for node in cluster.nodes:
            node.stop()
    for node in cluster.nodes:
        for index, document in served[node.name].items():
            assert replay_json(node.data_dir, index) == document, f"{node.name} at {index}"
