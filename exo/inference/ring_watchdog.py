"""A tensor rank's bound on a forward pass stuck in a collective.

MLX's ring backend has no collective timeout: a peer that stops answering without closing its
sockets (a SIGSTOPped runner, a process stuck in swap or a debugger) leaves every other rank
blocked in its next `all_sum` forever, and a blocked MLX call cannot be interrupted from Python.
What does end it is the connection: shutting down this process's ring sockets makes MLX raise
`[ring] connection to a peer was lost` in the blocked pass (checked with mlx 0.32). So a thread
here watches the pass the runner is in, and when one has run longer than the bound it cuts this
rank's ring connections; the runner then fails its requests and exits as for a dead peer, and
the ranks on the other side of the cut fail the same way a moment later.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable

import psutil

logger = logging.getLogger("exo.inference.ring_watchdog")

DEFAULT_PASS_TIMEOUT = 60.0  # seconds; a pass of a big model's prefill chunk on a CPU takes a few
PASS_TIMEOUT_ENVIRONMENT = "EXO_TENSOR_PASS_TIMEOUT"


def pass_timeout_from_environment(environment: dict[str, str] | None = None) -> float:
    """The bound from EXO_TENSOR_PASS_TIMEOUT (seconds, > 0), else the default. The worker starts
    runners with the node's environment, so one variable sets it for a node's every tensor rank."""
    raw = (os.environ if environment is None else environment).get(PASS_TIMEOUT_ENVIRONMENT, "")
    if not raw.strip():
        return DEFAULT_PASS_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{PASS_TIMEOUT_ENVIRONMENT} must be a number of seconds, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{PASS_TIMEOUT_ENVIRONMENT} must be a positive number of seconds, got {raw!r}")
    return value


def stall_reason(rank: int, timeout: float) -> str:
    return (
        f"tensor rank stalled: rank {rank}'s forward pass did not finish within {timeout:g} s "
        "(another rank stopped answering in a collective); the ring was cut"
    )


def ring_endpoints(hosts: Iterable[str], rank: int) -> tuple[int, set[tuple[str, int]]]:
    """This rank's ring port and the other ranks' (host, port), from the hostfile's HOST:PORTs."""
    parsed = [(host.rsplit(":", 1)[0].strip("[]"), int(host.rsplit(":", 1)[1])) for host in hosts]
    return parsed[rank][1], {peer for position, peer in enumerate(parsed) if position != rank}


def cut_ring_connections(own_port: int, peers: set[tuple[str, int]]) -> int:
    """Shut down every TCP connection of this process that belongs to the ring: accepted on our
    ring port, or dialled to a peer's. Returns how many; a socket closed meanwhile is skipped."""
    cut = 0
    for connection in psutil.Process().net_connections(kind="tcp"):
        if not connection.raddr or connection.fd < 0:
            continue
        remote = (connection.raddr.ip, connection.raddr.port)
        if connection.laddr.port != own_port and remote not in peers:
            continue
        try:
            duplicate = os.dup(connection.fd)
        except OSError:
            continue
        with socket.socket(fileno=duplicate) as ring_socket:  # closes the duplicate only
            try:
                ring_socket.shutdown(socket.SHUT_RDWR)  # acts on the connection, for MLX's fd too
                cut += 1
            except OSError:
                pass
    return cut


class PassWatchdog:
    """`begin()` before a pass and `end()` after it, from the runner's thread; a pass that runs
    longer than `timeout` seconds makes the thread call `on_stall(reason)` and then `cut()`."""

    def __init__(
        self,
        timeout: float,
        rank: int,
        cut: Callable[[], int],
        on_stall: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.timeout = timeout
        self.rank = rank
        self.fired: str | None = None
        self._cut = cut
        self._on_stall = on_stall
        self._started: float | None = None
        self._stop = threading.Event()
        self._check_every = min(1.0, timeout / 4)
        self._thread = threading.Thread(target=self._run, name="tensor-pass-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def begin(self) -> None:
        self._started = time.monotonic()

    def end(self) -> None:
        self._started = None

    def _run(self) -> None:
        while not self._stop.wait(self._check_every):
            started = self._started
            if started is None or self.fired is not None:
                continue
            if time.monotonic() - started > self.timeout:
                self.fired = stall_reason(self.rank, self.timeout)
                logger.error("%s", self.fired)
                self._on_stall(self.fired)
                logger.error("cut %d ring connection(s)", self._cut())

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
