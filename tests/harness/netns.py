"""Network-namespace harness: a private switch and N hosts, to run real multi-node clusters on one machine.

Layout for one `NetnsCluster` (names carry a per-run prefix `exo-<pid>-<n>-`):

    namespace <prefix>sw : bridge br0 (and br1.. while partitioned), one port p<i> per host
    namespace <prefix>h<i>: eth0 = 198.18.0.<i+1>/24 (veth to p<i>), lo up, 224.0.0.0/4 routed to eth0

The bridge lives in its own namespace, so nothing is added to the host's root namespace: its firewall
(bridge-nf-call-iptables, Docker's FORWARD DROP) never sees this traffic and no host address changes.
Cable pull = the switch side of a host's veth goes down (the host sees NO-CARRIER). Partition = the
hosts of each group are moved onto their own bridge; links stay up, nothing crosses between bridges.

Needs root and iproute2; `requires_netns` skips with the reason otherwise, unless EXO_REQUIRE_NETNS=1
(set in CI) turns the missing capability into a failure.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBNET = "198.18.0.0/24"
MAX_HOSTS = 200
NAMESPACE_NAME = re.compile(r"exo-(?P<pid>\d+)-(?:probe|\d+-(?:sw|h\d+))")
_cluster_numbers = itertools.count()


class NetnsError(RuntimeError):
    """An `ip` command failed, or namespaces are not available here."""


def ip(*arguments: str) -> str:
    """Run `ip ARGUMENTS...`; raise NetnsError with its stderr when it fails."""
    completed = subprocess.run(["ip", *arguments], capture_output=True, text=True, check=False, timeout=30)
    if completed.returncode != 0:
        raise NetnsError(f"ip {' '.join(arguments)}: {completed.stderr.strip() or completed.returncode}")
    return completed.stdout


def namespace_pids(namespace: str) -> list[int]:
    """Every process inside the namespace (not only the ones this harness started)."""
    try:
        return [int(pid) for pid in ip("netns", "pids", namespace).split()]
    except NetnsError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(namespace: str) -> None:
    for pid in namespace_pids(namespace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    ip("netns", "delete", namespace)


def sweep_stale_namespaces() -> list[str]:
    """Delete `exo-<pid>-...` namespaces whose creating process is gone (a run killed before cleanup)."""
    swept: list[str] = []
    for line in ip("netns", "list").splitlines():
        name = line.split(" ", 1)[0]
        match = NAMESPACE_NAME.fullmatch(name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(NetnsError):
            _delete_namespace(name)
            swept.append(name)
    return swept


@functools.cache
def netns_unavailable_reason() -> str | None:
    """None when namespaces, veth pairs and bridges can be made here; else why not."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, veth, bridge); CI runs them as root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"exo-{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except NetnsError as error:
        return f"cannot create a network namespace: {error}"
    try:
        ip("-n", probe, "link", "add", "br0", "type", "bridge")
        ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except NetnsError as error:
        return f"cannot create a bridge or veth pair in a namespace: {error}"
    finally:
        with contextlib.suppress(NetnsError):
            ip("netns", "delete", probe)
    return None


def _netns_required() -> bool:
    return os.environ.get("EXO_REQUIRE_NETNS") == "1"


requires_netns = pytest.mark.skipif(
    not _netns_required() and netns_unavailable_reason() is not None,
    reason=netns_unavailable_reason() or "",
)


class LineWatcher:
    """Reads a process's text output on a thread, so tests can wait for a line with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []  # every line seen so far, for failure messages
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=10_000)
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(
        self, predicate: Callable[[str], bool], timeout: float, what: str = "a matching line"
    ) -> str:
        """The next line matching `predicate`; TimeoutError (with the output so far) after `timeout`."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise EOFError(f"output ended before {what}; output:\n" + "\n".join(self.lines[-40:]))
            self.lines.append(line)
            if predicate(line):
                return line
        raise TimeoutError(f"no {what} within {timeout}s; output:\n" + "\n".join(self.lines[-40:]))


class NetnsHost:
    """One host of the cluster: a namespace with one address on the switch."""

    def __init__(self, index: int, namespace: str) -> None:
        self.index = index
        self.name = f"h{index}"
        self.namespace = namespace
        self.address = f"198.18.0.{index + 1}"
        self.switch_port = f"p{index}"
        self.processes: list[subprocess.Popen[str]] = []

    def __repr__(self) -> str:
        return f"NetnsHost({self.name}, {self.address})"

    def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: str | Path | None = None,
        stdout: int | IO[str] | None = subprocess.PIPE,
        stderr: int | IO[str] | None = subprocess.STDOUT,
    ) -> subprocess.Popen[str]:
        """Start `argv` inside this host (env is merged over os.environ; output unbuffered text lines)."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, *argv],
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,  # its own process group, so kill() reaches its children too
        )
        self.processes.append(process)
        return process

    def pids(self) -> list[int]:
        return namespace_pids(self.namespace)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to every process in this host (what `run` started and anything they started)."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


HostRef = NetnsHost | int


class NetnsCluster:
    """`with NetnsCluster(3) as cluster:` a switch and 3 hosts; everything is removed on exit."""

    def __init__(self, n_hosts: int) -> None:
        if not 1 <= n_hosts <= MAX_HOSTS:
            raise ValueError(f"n_hosts must be 1..{MAX_HOSTS}, got {n_hosts}")
        self.prefix = f"exo-{os.getpid()}-{next(_cluster_numbers)}-"
        self.switch = self.prefix + "sw"
        self.hosts = [NetnsHost(index, f"{self.prefix}h{index}") for index in range(n_hosts)]
        self._bridge_of: dict[int, str] = {}
        self._bridges: set[str] = set()
        self._created: list[str] = []
        self._closed = False

    def __enter__(self) -> Self:
        reason = netns_unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        sweep_stale_namespaces()
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _build(self) -> None:
        ip("netns", "add", self.switch)
        self._created.append(self.switch)
        self._add_bridge("br0")
        for host in self.hosts:
            ip("netns", "add", host.namespace)
            self._created.append(host.namespace)
            switch = ("-n", self.switch)
            inside = ("-n", host.namespace)
            ip(
                *switch,
                "link",
                "add",
                host.switch_port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.namespace,
            )
            ip(*switch, "link", "set", host.switch_port, "master", "br0")
            ip(*switch, "link", "set", host.switch_port, "up")
            self._bridge_of[host.index] = "br0"
            ip(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip(*inside, "link", "set", "lo", "up")
            ip(*inside, "link", "set", "eth0", "up")
            # mDNS sends to 224.0.0.251; with no default route the kernel needs this to pick eth0.
            ip(*inside, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def _add_bridge(self, bridge: str) -> None:
        # No STP and no IGMP snooping: ports forward at once and multicast floods like on a dumb switch.
        ip(
            "-n",
            self.switch,
            "link",
            "add",
            bridge,
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        )
        ip("-n", self.switch, "link", "set", bridge, "up")
        self._bridges.add(bridge)

    def close(self) -> None:
        """Kill every process in the hosts and delete all namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for host in self.hosts:
            host.kill(signal.SIGKILL)
        for host in self.hosts:
            for process in host.processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
        problems: list[str] = []
        for namespace in reversed(self._created):
            try:
                _delete_namespace(namespace)
            except NetnsError as error:
                problems.append(str(error))
        if problems:
            warnings.warn(f"netns cleanup left: {problems}", RuntimeWarning, stacklevel=2)

    def host(self, ref: HostRef) -> NetnsHost:
        return self.hosts[ref] if isinstance(ref, int) else self.hosts[ref.index]

    def address(self, ref: HostRef) -> str:
        return self.host(ref).address

    def link_down(self, ref: HostRef) -> None:
        """Pull the host's cable: its eth0 loses carrier; nothing in or out until link_up."""
        ip("-n", self.switch, "link", "set", self.host(ref).switch_port, "down")

    def link_up(self, ref: HostRef) -> None:
        ip("-n", self.switch, "link", "set", self.host(ref).switch_port, "up")

    def partition(self, *groups: Iterable[HostRef]) -> None:
        """Split the network: each group on its own bridge. Hosts named in no group stay with the first."""
        indexes = [[self.host(ref).index for ref in group] for group in groups]
        if len(indexes) < 2 or any(not group for group in indexes):
            raise ValueError("partition needs at least two non-empty groups")
        flat = [index for group in indexes for index in group]
        if len(flat) != len(set(flat)):
            raise ValueError("a host can be in only one partition group")
        target = dict.fromkeys(range(len(self.hosts)), "br0")
        for number, group in enumerate(indexes):
            for index in group:
                target[index] = f"br{number}"
        self._move_ports(target)

    def heal(self) -> None:
        """Undo partition(): every host back on br0."""
        self._move_ports(dict.fromkeys(range(len(self.hosts)), "br0"))

    def _move_ports(self, target: dict[int, str]) -> None:
        for index, bridge in sorted(target.items()):
            if self._bridge_of[index] == bridge:
                continue
            if bridge not in self._bridges:
                self._add_bridge(bridge)
            ip("-n", self.switch, "link", "set", self.hosts[index].switch_port, "master", bridge)
            self._bridge_of[index] = bridge


def python_env() -> dict[str, str]:
    """Environment for `host.run([sys.executable, ...])` so the child imports this checkout's `exo`."""
    existing = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(REPO_ROOT) + (os.pathsep + existing if existing else "")}


TCP_LISTENER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    connection, _ = server.accept()
    connection.close()
"""

TCP_PROBER = """
import socket, sys, time
host, port, state = sys.argv[1], int(sys.argv[2]), None
while True:
    try:
        socket.create_connection((host, port), timeout=0.3).close()
        now = "reachable"
    except OSError:
        now = "unreachable"
    if now != state:
        print(now, flush=True)
        state = now
    time.sleep(0.05)
"""


def start_tcp_listener(host: NetnsHost, port: int) -> LineWatcher:
    """A TCP server on host:port that accepts and closes; returns once it listens."""
    process = host.run([sys.executable, "-c", TCP_LISTENER, host.address, str(port)])
    assert process.stdout is not None
    watcher = LineWatcher(process.stdout)
    watcher.wait_for(lambda line: line == "listening", 15, "listener start")
    return watcher


def start_tcp_prober(host: NetnsHost, address: str, port: int) -> LineWatcher:
    """Connects from `host` to address:port every 50 ms, printing `reachable`/`unreachable` on each change."""
    process = host.run([sys.executable, "-c", TCP_PROBER, address, str(port)])
    assert process.stdout is not None
    return LineWatcher(process.stdout)
