"""Real exo nodes inside network namespaces: start, kill -9, restart, and read each node's HTTP API.

Each node runs in its own `NetnsHost` (tests/harness/netns.py) with discovery on, so the nodes find each
other by mDNS on the private switch, and every node can use the same ports (namespaces don't share
them). The API listens on 127.0.0.1 inside the node's namespace and is read through connections
made inside that namespace (tests/harness/netns_http.py), so it stays reachable while the node's cable is
out or it is partitioned away.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.harness.netns import NetnsCluster, NetnsHost, python_env
from tests.harness.netns_http import NamespaceConnection, NodeApiError, NodeApiStatusError

__all__ = ["ExoNode", "NetnsExoCluster", "NodeApiError", "NodeApiStatusError", "event_line", "replay_verify"]

BUS_PORT = 52414
API_PORT = 52415
LOG_TAIL_LINES = 60


class ExoNode:
    """One `python -m exo.node` process on a namespace host, its data dir kept across restarts."""

    def __init__(
        self,
        host: NetnsHost,
        node_id: str,
        data_dir: Path,
        *,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.node_id = node_id
        self.data_dir = data_dir
        self.log_path = data_dir / "node.log"
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.process: subprocess.Popen[str] | None = None

    def __repr__(self) -> str:
        return f"ExoNode({self.node_id} on {self.host.name} {self.host.address})"

    @property
    def events_db(self) -> Path:
        return self.data_dir / "events.db"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "exo.node",
            "--node-id",
            self.node_id,
            "--data-dir",
            str(self.data_dir),
            "--bus-port",
            str(BUS_PORT),
            "--api-port",
            str(API_PORT),
            "--api-host",
            "127.0.0.1",
            "-v",
            *self.extra_args,
        ]

    def start(self) -> None:
        """Start the node (discovery on, no --peers); returns at once, see wait_serving()."""
        if self.running:
            raise RuntimeError(f"{self} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:
            log.write(f"=== start {time.strftime('%H:%M:%S')} {' '.join(self.argv()[1:])}\n")
            log.flush()
            self.process = self.host.run(self.argv(), {**python_env(), **self.env}, stdout=log)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the node's process group (the node and its runners) and wait for the node to exit."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        self.process.wait(timeout=15)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def restart(self) -> None:
        self.kill()
        self.start()

    # --- HTTP, from inside the node's namespace ---------------------------------------------------

    def request(self, method: str, path: str, body: object = None, timeout: float = 2.0) -> tuple[int, bytes]:
        connection = NamespaceConnection(self.host.namespace, "127.0.0.1", API_PORT, timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {} if payload is None else {"Content-Type": "application/json"}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except http.client.HTTPException as error:
            raise NodeApiError(f"{method} {path} on {self.node_id}: {error!r}") from error
        finally:
            connection.close()

    def call(self, method: str, path: str, body: object = None, timeout: float = 2.0) -> Any:
        """The JSON answer; NodeApiStatusError on a non-2xx status."""
        status, data = self.request(method, path, body, timeout)
        if not 200 <= status < 300:
            raise NodeApiStatusError(method, path, status, data.decode(errors="replace"))
        return json.loads(data)

    def get(self, path: str, timeout: float = 2.0) -> Any:
        return self.call("GET", path, timeout=timeout)

    def post(self, path: str, body: object, timeout: float = 30.0) -> Any:
        return self.call("POST", path, body, timeout)

    def delete(self, path: str, timeout: float = 30.0) -> Any:
        return self.call("DELETE", path, timeout=timeout)

    def state(self) -> dict[str, Any]:
        return self.get("/state")

    def serving(self) -> bool:
        return bool(self.get("/health", timeout=0.5))

    def events(self) -> list[dict[str, Any]]:
        """The node's whole indexed log, page by page."""
        events: list[dict[str, Any]] = []
        while True:
            page = self.get(f"/events?since={len(events)}&limit=1000")
            if not page:
                return events
            events.extend(page)

    def stream(self, path: str, body: object, timeout: float = 60.0) -> Iterator[str]:
        """POST `body` and yield the answer's non-empty lines as they arrive (server-sent events)."""
        connection = NamespaceConnection(self.host.namespace, "127.0.0.1", API_PORT, timeout)
        try:
            connection.request(
                "POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            if response.status != 200:
                raise NodeApiStatusError("POST", path, response.status, response.read().decode())
            for raw in response:
                line = raw.decode().strip()
                if line:
                    yield line
        except http.client.HTTPException as error:
            raise NodeApiError(f"stream {path} on {self.node_id}: {error!r}") from error
        finally:
            connection.close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class NetnsExoCluster:
    """`with NetnsExoCluster(tmp_path, 3) as cluster:` one exo node per namespace host, by mDNS.

    Node i is `n<i>` on host h<i> (198.18.0.<i+1>), data in ROOT/n<i>. On a failing test, every
    node's log tail is written to stderr (pytest shows it with the failure).
    """

    def __init__(self, root: Path, size: int, *, extra_args: Sequence[str] = ()) -> None:
        self.root = root
        self.network = NetnsCluster(size)
        self.nodes = [
            ExoNode(host, f"n{host.index}", root / f"n{host.index}", extra_args=extra_args)
            for host in self.network.hosts
        ]

    def __enter__(self) -> Self:
        self.network.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            for node in self.nodes:
                node.kill()
        finally:
            self.network.close()
            if exc_type is not None:
                sys.stderr.write(self.log_tails())

    def log_tails(self) -> str:
        return "".join(f"\n--- {node.node_id} log tail ---\n{node.log_tail()}\n" for node in self.nodes)

    def node(self, node_id: str) -> ExoNode:
        return next(node for node in self.nodes if node.node_id == node_id)

    def running(self) -> list[ExoNode]:
        return [node for node in self.nodes if node.running]

    def start_all(self) -> None:
        for node in self.nodes:
            node.start()

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for node in self.nodes:
            node.kill(sig)

    def wait_serving(self, timeout: float = 30.0, nodes: Sequence[ExoNode] | None = None) -> None:
        """Until every given (default: running) node answers /health."""
        targets = list(nodes or self.running())

        def serving() -> bool:
            for node in targets:
                if node.process is not None and node.process.poll() is not None:
                    # Exited: no point waiting out the deadline (the log tail says why).
                    raise AssertionError(
                        f"{node.node_id} exited with {node.process.returncode} before serving"
                    )
            return all(node.serving() for node in targets)

        self.wait_until(serving, timeout, "every API serving")

    def wait_until(
        self, condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
    ) -> Any:
        """Poll `condition` until it returns something truthy. At the deadline: AssertionError naming
        `what`, the last error and each running node's /state (the log tails follow from __exit__)."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = condition()
            except (OSError, ValueError, KeyError, TypeError) as error:
                last_error, result = error, None
            if result:
                return result
            time.sleep(interval)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})\n" + self.describe()
        )

    def holds(
        self, problem: Callable[[], str | None], seconds: float, what: str, interval: float = 0.05
    ) -> None:
        """Poll for `seconds` that `what` stays true: `problem()` returns None while it does, else a
        sentence saying what broke, which fails at once (with every node's view). An API error makes a
        poll inconclusive, not a failure; all polls inconclusive fails."""
        deadline = time.monotonic() + seconds
        conclusive = 0
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                found = problem()
            except (OSError, ValueError, KeyError, TypeError) as error:
                last_error = error
            else:
                conclusive += 1
                if found is not None:
                    raise AssertionError(f"{what} stopped holding: {found}\n" + self.describe())
            time.sleep(interval)
        if not conclusive:
            raise AssertionError(f"could not check {what} (last error: {last_error!r})\n" + self.describe())

    def describe(self) -> str:
        """Each node's /state and its log, one line per event, for failure messages."""
        lines: list[str] = []
        for node in self.nodes:
            if not node.running:
                lines.append(f"{node.node_id}: not running")
                continue
            try:
                lines.append(f"{node.node_id}: {json.dumps(node.state(), sort_keys=True)}")
                lines.extend(f"  {event_line(event)}" for event in node.events())
            except (OSError, ValueError) as error:
                lines.append(f"{node.node_id}: /state or /events failed: {error!r}")
        return "\n".join(lines) + "\n"

    # --- conditions to poll for ------------------------------------------------------------------

    def converged(self, nodes: Sequence[ExoNode] | None = None) -> dict[str, Any] | None:
        """The common state when every given (default: running) node serves the identical document."""
        states = [node.state() for node in (nodes or self.running())]
        first = json.dumps(states[0], sort_keys=True)
        if all(json.dumps(state, sort_keys=True) == first for state in states[1:]):
            return states[0]
        return None

    def agreed(
        self,
        nodes: Sequence[ExoNode] | None = None,
        *,
        alive: Sequence[str] = (),
        gone: Sequence[str] = (),
        master_not: str | None = None,
    ) -> dict[str, Any] | None:
        """The converged state when it has a master (not `master_not`), and the listed nodes' statuses."""
        state = self.converged(nodes)
        if state is None or state["master_node_id"] in (None, master_not):
            return None
        statuses = {node_id: node["status"] for node_id, node in state["nodes"].items()}
        if any(statuses.get(node_id) != "alive" for node_id in alive):
            return None
        if any(statuses.get(node_id) != "gone" for node_id in gone):
            return None
        return state

    def wait_formed(self, timeout: float, nodes: Sequence[ExoNode] | None = None) -> dict[str, Any]:
        """One master and every given (default: running) node alive, the same state everywhere."""
        members = list(nodes or self.running())
        return self.wait_until(
            lambda: self.agreed(members, alive=[node.node_id for node in members]),
            timeout,
            f"one master and {[node.node_id for node in members]} alive, identical state",
        )


def event_line(event: dict[str, Any]) -> str:
    """`index term type field=value...`: an indexed event from /events on one line."""
    body = {key: value for key, value in event["event"].items() if key != "type"}
    fields = " ".join(f"{key}={json.dumps(value, sort_keys=True)}" for key, value in sorted(body.items()))
    return f"{event['index']:>4} t{event['term']} {event['event']['type']} {fields}"


def replay_verify(events_db: Path) -> subprocess.CompletedProcess[str]:
    """`exo-replay --verify` on a node's log (run here: the file needs no network)."""
    return subprocess.run(
        [sys.executable, "-m", "exo.replay", str(events_db), "--verify"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, **python_env()},
    )
