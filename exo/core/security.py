"""The cluster's CURVE key pair and how a ZeroMQ socket wears it, shared by the bus and the runners.

Pure: the keys are derived from the cluster secret by exo.bus.security (which needs libzmq); here
is only what both ZeroMQ users need on top, so neither adapter imports the other. Sockets are duck
typed (anything with pyzmq's `curve_*` attributes).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

# The worker hands its runners the derived key pair in this variable (never on a command line, and
# never the secret itself): "PUBLIC SECRET", both Z85 text.
CLUSTER_KEYS_ENVIRONMENT = "EXO_CLUSTER_KEYS"


@dataclass(frozen=True)
class BusSecurity:
    """CURVE keys derived from the cluster secret; None fields mean an open bus."""

    public_key: bytes | None = None
    secret_key: bytes | None = None

    @property
    def enabled(self) -> bool:
        return self.public_key is not None and self.secret_key is not None

    def environment_value(self) -> str | None:
        """The keys as CLUSTER_KEYS_ENVIRONMENT carries them (None on an open bus)."""
        if self.public_key is None or self.secret_key is None:
            return None
        return f"{self.public_key.decode()} {self.secret_key.decode()}"

    @classmethod
    def from_environment_value(cls, value: str | None) -> BusSecurity:
        """The keys a worker handed down; an open bus when unset, ValueError when malformed."""
        if not value:
            return cls()
        parts = value.split()
        if len(parts) != 2 or any(len(part) != 40 for part in parts):  # Z85 of 32 bytes
            raise ValueError(f"{CLUSTER_KEYS_ENVIRONMENT} must be two 40-character Z85 keys")
        return cls(public_key=parts[0].encode(), secret_key=parts[1].encode())


def apply_curve(socket: Any, security: BusSecurity, *, server: bool) -> None:
    """Make `socket` a CURVE server or client with the cluster's keys (nothing on an open bus).

    Used for the bus sockets and for the runners' activation and token sockets, which are made
    outside the bus's socket factory (plain zmq in the runner subprocess).
    """
    if not security.enabled:
        return
    assert security.public_key is not None and security.secret_key is not None
    socket.curve_publickey = security.public_key
    socket.curve_secretkey = security.secret_key
    if server:
        socket.curve_server = True
    else:
        # Every node derives the same key pair from the secret: it is also the server key.
        socket.curve_serverkey = security.public_key


class SameKeyOnly:
    """The ZAP rule of every CURVE server: only a client holding the cluster's own key gets in."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key

    def callback(self, domain: str, key: bytes) -> bool:
        return secrets.compare_digest(key, self.public_key)
