"""The processes the suite measures: exo nodes, `mlx_lm.server`, the in-process mlx-lm baseline.

Each is a real subprocess in its own session (so stopping it also stops what it started, such as a
node's runners), optionally pinned to cores with `taskset -c`. Models are made with the synthetic
maker's command line, as a user would.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.harness.cluster_harness import free_port, wait_until

START_TIMEOUT = 180.0  # seconds for a process to serve (a loaded 2-core machine starts slowly)
READY_TIMEOUT = 300.0  # seconds for an instance's runners to load their shards


class ProcessFailed(RuntimeError):
    """A measured process did not start, died, or refused a request; says which and why."""


def poll(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call `condition` until it returns something truthy, or raise naming `what` at the deadline."""
    try:
        return wait_until(condition, timeout, what, interval)
    except AssertionError as error:  # the tests' helper fails a test; a bench run names the process
        raise ProcessFailed(str(error)) from None


def make_model(models_dir: Path, name: str, arguments: Sequence[str]) -> Path:
    """A synthetic model made by `python -m exo.inference.synthetic`, unless it is already there."""
    target = models_dir / name
    if (target / "config.json").is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "exo.inference.synthetic", str(target), *arguments]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return target


def linked_copy(source: Path, name: str) -> Path:
    """The same model under another id (hard links, no second copy of the weights): two instances
    of one model, side by side in one cluster, can then be addressed by model id."""
    target = source.parent / name
    if (target / "config.json").is_file():
        return target
    building = source.parent / f".{name}.building"
    building.mkdir(exist_ok=True)
    for file in source.iterdir():
        destination = building / file.name
        if not destination.exists():
            os.link(file, destination)
    building.rename(target)
    return target


def eos_token_ids(model: Path) -> list[int]:
    config = json.loads((model / "config.json").read_text())
    eos = config.get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


@dataclass
class ServerProcess:
    """A process serving HTTP on `port`, started in its own session, logging to `log_path`."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict[str, str])
    cpus: list[int] | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        prefix = ["taskset", "-c", ",".join(map(str, self.cpus))] if self.cpus is not None else []
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*prefix, *self.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise ProcessFailed(f"{self.name} exited (status {code}); log tail:\n{self.log_tail()}")

    def wait_serving(self, path: str, timeout: float = START_TIMEOUT) -> None:
        def serving() -> bool:
            self.check_alive()
            return httpx.get(self.url + path, timeout=5).status_code == 200

        poll(serving, timeout, f"{self.name} to serve {path}")

    def stop(self) -> None:
        """SIGTERM to the whole session (graceful shutdown), SIGKILL if it lingers."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def exo_node(
    root: Path, name: str, models_dir: Path, *, bus_port: int, peers: list[str], cpus: list[int] | None
) -> ServerProcess:
    data_dir = root / name
    api_port = free_port()
    argv = [
        sys.executable, "-m", "exo.node", "--node-id", name, "--data-dir", str(data_dir),
        "--models-dir", str(models_dir), "--api-port", str(api_port), "--bus-port", str(bus_port),
        "--no-discovery", "--peers", ",".join(peers),
    ]  # fmt: skip
    return ServerProcess(name, argv, api_port, data_dir / "node.log", cpus=cpus)


def mlx_server(model: Path, log_dir: Path) -> ServerProcess:
    """`mlx_lm.server` on the same BLAS as exo's runners: MKL is loaded before mlx_lm is imported."""
    port = free_port()
    wrapper = (
        "from exo.inference.blas import load_optimized_blas; load_optimized_blas(); "
        "from mlx_lm import server; server.main()"
    )
    argv = [
        sys.executable,
        "-c",
        wrapper,
        "--model",
        str(model),
        "--port",
        str(port),
        "--log-level",
        "WARNING",
    ]
    return ServerProcess("mlx_lm.server", argv, port, log_dir / "mlx_lm_server.log")


class ExoCluster:
    """Nodes on loopback that all name each other as static peers."""

    def __init__(self, root: Path, models_dir: Path, count: int, pins: list[list[int]] | None = None) -> None:
        bus_ports = [free_port() for _ in range(count)]
        peers = [f"127.0.0.1:{port}" for port in bus_ports]
        self.nodes = {
            f"node{index}": exo_node(
                root,
                f"node{index}",
                models_dir,
                bus_port=bus_ports[index],
                peers=peers,
                cpus=pins[index] if pins else None,
            )
            for index in range(count)
        }

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()
        self.wait_ready()

    def wait_ready(self) -> None:
        """Every node serving HTTP, alive in the state, under one master."""
        for node in self.nodes.values():
            node.wait_serving("/health")
        any_node = next(iter(self.nodes.values()))

        def agreed() -> bool:
            for node in self.nodes.values():
                node.check_alive()
            state = httpx.get(any_node.url + "/state", timeout=5).json()
            alive = sum(entry["status"] == "alive" for entry in state["nodes"].values())
            return state["master_node_id"] is not None and alive == len(self.nodes)

        poll(agreed, START_TIMEOUT, "every node alive under one master")

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def place(self, model_id: str, min_nodes: int) -> dict[str, Any]:
        """Place an instance and wait until it is ready; returns its document."""
        return self.wait_instance_ready(model_id, self.start_placing(model_id, min_nodes))

    def start_placing(self, model_id: str, min_nodes: int) -> str:
        """Ask for an instance; returns its id at once (placement counts it while it loads, so a
        second one placed before it is ready goes to another node when one has room)."""
        any_node = next(iter(self.nodes.values()))
        body = {"model_id": model_id, "sharding": "Pipeline", "min_nodes": min_nodes}
        response = httpx.post(any_node.url + "/place_instance", json=body, timeout=120)
        if response.status_code != 200:
            raise ProcessFailed(f"placing {model_id} on {min_nodes} node(s): {response.text}")
        return str(response.json()["instance_id"])

    def wait_instance_ready(self, model_id: str, instance_id: str) -> dict[str, Any]:
        any_node = next(iter(self.nodes.values()))

        def ready() -> dict[str, Any] | None:
            for node in self.nodes.values():
                node.check_alive()
            instance = httpx.get(f"{any_node.url}/instance/{instance_id}", timeout=5).json()
            if instance["status"] == "failed":
                raise ProcessFailed(f"instance of {model_id} failed: {instance.get('failure_reason')}")
            return instance if instance["status"] == "ready" else None

        instance: dict[str, Any] = poll(ready, READY_TIMEOUT, f"{model_id} to be ready")
        return instance

    def entry_url(self, instance: dict[str, Any]) -> str:
        """The API of the node holding the first stage: the requester then shares that stage's
        node, as a single-node setup would, instead of adding another process in the path."""
        assignments: dict[str, dict[str, int]] = instance["shard_assignments"]
        first = min(assignments, key=lambda node_id: assignments[node_id]["start_layer"])
        return self.nodes[first].url


class InProcessBaseline:
    """`python -m bench.inprocess MODEL`: mlx-lm's stream_generate, one JSON request per line."""

    def __init__(self, model: Path, log_path: Path, reference_blas: bool = False) -> None:
        environment = {**os.environ, "EXO_BLAS": "reference" if reference_blas else ""}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.inprocess", str(model)],
                env=environment,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.blas = "not loaded yet"

    def wait_ready(self) -> None:
        self.blas = str(self._answer(START_TIMEOUT)["blas"])

    def run(self, request: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self._answer(timeout)
        if "error" in answer:
            raise ProcessFailed(f"in-process mlx-lm: {answer['error']}")
        return answer

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ProcessFailed(f"in-process mlx-lm gave no answer within {timeout:.0f}s:\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
