"""A tensor rank's bound on a forward pass stuck in a collective.

MLX's ring backend has no collective timeout: a peer that stops answering without closing its
sockets (a SIGSTOPped runner, a process stuck in swap or a debugger) leaves every other rank
blocked in its next `all_sum` forever, and a blocked MLX call cannot be interrupted from Python.
What does end it is the connection: shutting down this process's ring sockets makes MLX raise
`[ring] connection to a peer was lost` in the blocked pass (checked with mlx 0.32). So a thread
here watches the pass the runner is in, and when one has run longer than the bound it cuts this
rank's ring connections; the runner then fails its requests and exits as for a dead peer, and
the ranks on the other side of the cut fail the same way a moment later.

MLX's ring gives up on a connection for good: once a socket thread has failed its pending sends
and receives ("[ring] Too many send/recv errors"), it exits, and any collective queued after that
waits forever (checked with mlx 0.32.4: a peer killed while a pass still has all_sums queued
leaves the pass stuck, cut or not). So the watchdog also notices a peer that is gone (its ring
connections no longer established, seen once a pass has run a second) and, when a pass is still
running `grace` seconds after the ring broke or was cut, calls `abandon`: the runner tells its
requesters and exits, with a code its worker reads (`abandoned_exit`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from exo.core.events import RunnerFailure

logger = logging.getLogger("exo.inference.ring_watchdog")

EXIT_STALLED = 75  # a runner that abandoned a pass stuck after its watchdog cut a frozen peer's ring
EXIT_RING_LOST = 76  # ... stuck after a peer's ring connections closed (the peer process died)
ABANDON_GRACE = 1.0  # seconds a pass may still run after the ring broke, before the runner exits
LOST_CHECK_AFTER = 1.0  # a pass younger than this is never checked (a decode step takes ~10-100 ms)
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


def _ring_connections(own_port: int, peers: set[tuple[str, int]]) -> list[Any]:
    """This process's TCP connections of the ring: accepted on our ring port, or dialled to a peer's."""
    return [
        connection
        for connection in psutil.Process().net_connections(kind="tcp")
        if connection.raddr
        and connection.fd >= 0
        and (connection.laddr.port == own_port or (connection.raddr.ip, connection.raddr.port) in peers)
    ]


def cut_ring_connections(own_port: int, peers: set[tuple[str, int]]) -> int:
    """Shut down every TCP connection of this process that belongs to the ring. Returns how many;
    a socket closed meanwhile is skipped."""
    cut = 0
    for connection in _ring_connections(own_port, peers):
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


class RingHealth:
    """Whether this rank's ring connections are all still up. Counted when the ring has formed; a
    peer process that dies closes its ends, so ours leave ESTABLISHED (CLOSE_WAIT, or gone from
    the table after a reset)."""

    def __init__(self, own_port: int, peers: set[tuple[str, int]]) -> None:
        self.own_port = own_port
        self.peers = peers
        self.expected = len(self._established())

    def _established(self) -> list[Any]:
        return [
            c for c in _ring_connections(self.own_port, self.peers) if c.status == psutil.CONN_ESTABLISHED
        ]

    def lost(self) -> str | None:
        """Why the ring is broken, or None while every connection it formed with is up."""
        connections = _ring_connections(self.own_port, self.peers)
        for connection in connections:
            if connection.status != psutil.CONN_ESTABLISHED:
                peer = f"{connection.raddr.ip}:{connection.raddr.port}"
                return f"ring connection with {peer} is {connection.status} (the peer closed it)"
        if len(connections) < self.expected:
            return f"{self.expected - len(connections)} of its {self.expected} ring connections are gone"
        return None


def abandoned_exit(code: int) -> tuple[str, RunnerFailure | None] | None:
    """The worker's reading of a runner's exit code: the reason and failure kind of a tensor rank
    that abandoned a stuck pass, or None for any other code."""
    if code == EXIT_STALLED:
        return "a tensor rank's pass stayed stuck after its watchdog cut a frozen peer's ring", "tensor_stall"
    if code == EXIT_RING_LOST:
        return "a tensor rank's pass stayed stuck after a peer rank's process died", None
    return None


class PassWatchdog:
    """`begin()` before a pass and `end()` after it, from the runner's thread. A pass that runs
    longer than `timeout` seconds makes the thread call `on_stall(reason)` and then `cut()`; one
    that has run `LOST_CHECK_AFTER` seconds while `lost()` names a broken ring is noted the same
    way (nothing to cut). A pass still running `grace` seconds after either makes the thread call
    `abandon(reason, stalled)`, where the runner exits (MLX would never end that pass)."""

    def __init__(
        self,
        timeout: float,
        rank: int,
        cut: Callable[[], int],
        on_stall: Callable[[str], None] = lambda reason: None,
        *,
        lost: Callable[[], str | None] = lambda: None,
        abandon: Callable[[str, bool], None] | None = None,
        grace: float = ABANDON_GRACE,
    ) -> None:
        self.timeout = timeout
        self.rank = rank
        self.fired: str | None = None
        self.stalled = False
        self._cut = cut
        self._on_stall = on_stall
        self._lost = lost
        self._abandon = abandon
        self._grace = grace
        self._fired_at: float | None = None
        self._started: float | None = None
        self._stop = threading.Event()
        self._check_every = min(1.0, timeout / 4, grace / 2)
        self._thread = threading.Thread(target=self._run, name="tensor-pass-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def begin(self, now: float | None = None) -> None:
        self._started = time.monotonic() if now is None else now

    def end(self) -> None:
        self._started = None

    def _run(self) -> None:
        while not self._stop.wait(self._check_every):
            if self.poll(time.monotonic()):
                return

    def poll(self, now: float) -> bool:
        """One check at `now` (the thread's, every `_check_every` s); True once it abandoned."""
        started = self._started
        if started is None:
            return False
        if self.fired is None:
            self._check(now - started, now)
        elif self._abandon is not None and self._fired_at is not None and now - self._fired_at > self._grace:
            logger.error("rank %d's pass still stuck %g s later: the runner exits", self.rank, self._grace)
            self._abandon(self.fired, self.stalled)
            return True
        return False

    def _check(self, ran: float, now: float) -> None:
        if ran > self.timeout:
            self.fired = stall_reason(self.rank, self.timeout)
            self.stalled = True
            self._fired_at = now
            logger.error("%s", self.fired)
            self._on_stall(self.fired)
            logger.error("cut %d ring connection(s)", self._cut())
        elif ran > LOST_CHECK_AFTER and (why := self._lost()) is not None:
            self.fired = f"tensor rank lost a peer: rank {self.rank}'s {why}"
            self._fired_at = now
            logger.error("%s", self.fired)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
