"""Connection limits for the node's HTTP server (uvicorn, h11), so no client can exhaust the node.

uvicorn bounds a request's header size (h11: 16 KiB) and closes a keep-alive connection idle for
`timeout_keep_alive` seconds, but it sets no timer on a new connection, and any byte received
cancels the keep-alive timer: a client that sends its headers a byte at a time holds a socket (a
file descriptor) forever. 2,100 such connections used up the node's descriptors; then every
accept failed, and asyncio logged a traceback for each. Here:

- `GuardedH11Protocol` closes a connection whose request headers are not complete
  HEADER_TIMEOUT_SECONDS (10 s) after it opened or after its previous response, and refuses a
  connection beyond `max_connections` at once (503, OpenAI's error shape, `Connection: close`);
- `connection_limit()` keeps the cap well below the process's descriptor limit, so the bus, the
  store and the runners always have descriptors left (the node keeps its mastership);
- `AcceptErrorLimiter` turns asyncio's repeated "socket.accept() out of system resource" reports
  into one log line per ACCEPT_LOG_SECONDS with a count.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import h11
import msgspec
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

HEADER_TIMEOUT_SECONDS = 10.0
KEEP_ALIVE_SECONDS = 5
ACCEPT_LOG_SECONDS = 10.0
DESCRIPTORS_KEPT = 256  # for the bus, the store, the runners' sockets, the models' files
MAX_CONNECTIONS_CAP = 1000


def descriptor_budget() -> int:
    """Connections the descriptor limit leaves room for: half of what is left after
    DESCRIPTORS_KEPT (a connection may also hold a file or a socket while it is served)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, (soft - DESCRIPTORS_KEPT) // 2)


def default_max_connections() -> int:
    """At most MAX_CONNECTIONS_CAP, within the descriptor budget."""
    return min(MAX_CONNECTIONS_CAP, descriptor_budget())


def connection_limit(requested: int | None) -> int:
    """`--max-connections` (or the default), never past the descriptor budget: with the
    descriptors gone, the node's own sockets fail and it loses its mastership (seen: a cap of
    8,000 under a 4,096 limit). A request above the budget is lowered, with a warning."""
    if requested is None:
        return default_max_connections()
    budget = descriptor_budget()
    if requested > budget:
        logger.warning(
            "--max-connections %d is more than the file descriptor limit leaves room for: using %d",
            requested,
            budget,
        )
        return budget
    return requested


def raise_descriptor_limit() -> int:
    """Raise the soft descriptor limit to the hard one (what the system allows this process);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _refusal(message: str) -> bytes:
    body = msgspec.json.encode(
        {"error": {"message": message, "type": "server_error", "param": None, "code": "too_many_connections"}}
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"retry-after: 1\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (see the module)."""

    max_connections = MAX_CONNECTIONS_CAP
    header_timeout = HEADER_TIMEOUT_SECONDS
    refused = 0  # connections refused over the cap, by every server of this class
    timed_out = 0  # connections closed for slow headers

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            type(self).refused += 1
            transport.write(_refusal(f"this node serves at most {self.max_connections} connections at once"))
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers get the same deadline

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        waiting_for_headers = self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete
        )
        if waiting_for_headers and not self.transport.is_closing():
            type(self).timed_out += 1
            self.transport.close()


def guarded_protocol(
    max_connections: int, header_timeout: float = HEADER_TIMEOUT_SECONDS
) -> type[H11Protocol]:
    """A GuardedH11Protocol class with these limits (uvicorn takes the class as `http=`)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"max_connections": max_connections, "header_timeout": header_timeout, "refused": 0, "timed_out": 0},
    )


def uvicorn_options(max_connections: int, header_timeout: float = HEADER_TIMEOUT_SECONDS) -> dict[str, Any]:
    """The uvicorn.Config keywords that bound connections (see the module docstring)."""
    return {
        "http": guarded_protocol(max_connections, header_timeout),
        # uvicorn answers 503 once connections or tasks reach it; the cap above refuses first.
        "limit_concurrency": max_connections + 1,
        "backlog": min(2048, max_connections * 2),
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "h11_max_incomplete_event_size": 16 * 1024,  # request line and headers
    }


class AcceptErrorLimiter:
    """A loop exception handler that reports asyncio's accept failures (out of descriptors or
    memory) once per ACCEPT_LOG_SECONDS with a count, and hands anything else to the handler
    that was there before."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = ACCEPT_LOG_SECONDS) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        self._interval = interval
        self._last_logged = -float("inf")
        self.suppressed = 0
        self.seen = 0

    def install(self) -> AcceptErrorLimiter:
        self._loop.set_exception_handler(self)
        return self

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if not message.startswith("socket.accept() out of system resource"):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.seen += 1
        now = time.monotonic()
        if now - self._last_logged < self._interval:
            self.suppressed += 1
            return
        error = context.get("exception")
        more = f" ({self.suppressed} more in the last {self._interval:.0f} s)" if self.suppressed else ""
        logger.error("the API cannot accept connections: %s%s", error or message, more)
        self._last_logged = now
        self.suppressed = 0
