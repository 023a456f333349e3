"""HTTP to a server inside a network namespace, from a test process in the root namespace.

A server bound to 127.0.0.1 inside a namespace (an exo node's API) is unreachable from outside it.
A short-lived thread calls setns(2) into the namespace, connects, and hands the connected socket
back: a socket keeps the namespace it was made in, so the test's own thread then uses it normally
with `http.client`. That costs well under a millisecond per connection, against ~0.3 s for
`ip netns exec ... curl`, and it works while the namespace's cable is out or it is partitioned away.
Needs CAP_SYS_ADMIN (the namespace tests run as root).
"""

from __future__ import annotations

import ctypes
import http.client
import os
import socket
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")  # where `ip netns add` keeps the namespace handles


class NodeApiError(OSError):
    """The node's API could not be reached, or the connection broke mid-answer."""


class NodeApiStatusError(ValueError):
    """The node's API answered with a non-2xx status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> {status}: {body[:500]}")
        self.status = status
        self.body = body


_libc = ctypes.CDLL(None, use_errno=True)


def connect_in_namespace(namespace: str, address: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to address:port made from inside `namespace` (usable from any thread)."""
    outcome: list[socket.socket | OSError] = []

    def connect() -> None:
        try:
            descriptor = os.open(NETNS_DIR / namespace, os.O_RDONLY)
            try:
                if _libc.setns(descriptor, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns into {namespace}: {os.strerror(error)}")
            finally:
                os.close(descriptor)
            # This thread now lives in the namespace and ends right after: nothing else runs here.
            outcome.append(socket.create_connection((address, port), timeout=timeout))
        except OSError as error:  # handed to the caller's thread, re-raised there
            outcome.append(error)

    thread = threading.Thread(target=connect, name=f"connect-{namespace}", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if not outcome:
        raise NodeApiError(f"connecting inside {namespace} to {address}:{port} did not finish")
    result = outcome[0]
    if isinstance(result, OSError):
        raise NodeApiError(f"{address}:{port} in {namespace}: {result}") from result
    return result


class NamespaceConnection(http.client.HTTPConnection):
    """`http.client` over a connection made inside a network namespace."""

    def __init__(self, namespace: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.namespace = namespace
        self.connect_timeout = timeout

    def connect(self) -> None:
        self.sock = connect_in_namespace(self.namespace, self.host, self.port, self.connect_timeout)
