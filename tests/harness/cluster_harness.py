"""Real node processes on loopback for multi-node tests: start, kill, restart, read their API."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

LOWEST_TEST_PORT = 15_000


def ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def _test_ports() -> Iterator[int]:
    """Ports below the kernel's ephemeral range, from a random start, each handed out once per
    run: a port taken with bind(0) could be handed by the kernel to another socket's ephemeral bind
    (a node's PUB) or outgoing connection before the node that was given it binds it."""
    low = ephemeral_port_range()[0]
    if low - LOWEST_TEST_PORT < 1_000:
        while True:  # no room below the range: the kernel's choice, as before
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                yield int(probe.getsockname()[1])
    span = low - LOWEST_TEST_PORT
    start = random.randrange(span)
    for offset in itertools.count():
        yield LOWEST_TEST_PORT + (start + offset) % span


_PORTS = _test_ports()


def free_port() -> int:
    """A loopback TCP port nothing listens on now, never handed out before in this run."""
    for _ in range(1_000):
        port = next(_PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering): the next one
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as error:
            last_error = error
            result = None
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


@dataclass
class NodeProcess:
    name: str
    data_dir: Path
    bus_port: int
    api_port: int
    peers: list[str]
    extra_args: list[str] = field(default_factory=list[str])
    env: dict[str, str] = field(default_factory=dict[str, str])
    command_prefix: list[str] = field(default_factory=list[str])  # e.g. prlimit ... --
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.name} already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "node.log"
        argv = [
            *self.command_prefix,
            sys.executable,
            "-m",
            "exo.node",
            "--node-id",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--bus-port",
            str(self.bus_port),
            "--api-port",
            str(self.api_port),
            "--no-discovery",
            "--peers",
            ",".join(self.peers),
            "-v",
            *self.extra_args,
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True
        )
        log.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=15)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, path: str, timeout: float = 2.0) -> Any:
        response = httpx.get(self.url + path, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: object, timeout: float = 30.0) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=timeout)

    def state(self) -> dict[str, Any]:
        return self.get("/state")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class LoopbackCluster:
    def __init__(self, root: Path, size: int, extra_args: list[str] | None = None) -> None:
        bus_ports = [free_port() for _ in range(size)]
        peers = [f"127.0.0.1:{port}" for port in bus_ports]
        self.nodes = [
            NodeProcess(
                name=f"node{i}",
                data_dir=root / f"node{i}",
                bus_port=bus_ports[i],
                api_port=free_port(),
                peers=peers,
                extra_args=list(extra_args or []),
            )
            for i in range(size)
        ]

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for node in self.nodes:
            node.kill()
        if exc_info[0] is not None:
            for node in self.nodes:
                sys.stderr.write(f"--- {node.name} log ---\n{node.log_tail()}\n")

    def start_all(self) -> None:
        for node in self.nodes:
            node.start()

    def running(self) -> list[NodeProcess]:
        return [node for node in self.nodes if node.running]

    def states(self, nodes: list[NodeProcess] | None = None) -> list[dict[str, Any]]:
        return [node.state() for node in (nodes or self.running())]

    def converged(self, nodes: list[NodeProcess] | None = None) -> dict[str, Any] | None:
        """The common state when every given node serves the identical document, else None."""
        states = self.states(nodes)
        first = json.dumps(states[0], sort_keys=True)
        if all(json.dumps(state, sort_keys=True) == first for state in states[1:]):
            return states[0]
        return None
