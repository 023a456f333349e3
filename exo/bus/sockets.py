"""The one place where ZeroMQ sockets are made, so every socket gets the same options and security."""

from __future__ import annotations

from typing import Any, TypeVar

import zmq
import zmq.asyncio

from exo.core.security import BusSecurity, apply_curve

_AnySocket = TypeVar("_AnySocket", bound="zmq.Socket[Any]")

# Bounded queues: a slow or dead peer costs at most this many frames of memory per socket.
SEND_HIGH_WATER_MARK = 10_000
RECEIVE_HIGH_WATER_MARK = 10_000
# A frame larger than this is refused by ZeroMQ before it reaches Python (protects every socket).
MAX_FRAME_BYTES = 256 * 1024 * 1024


class SocketFactory:
    def __init__(self, context: zmq.asyncio.Context, security: BusSecurity | None = None) -> None:
        self.context = context
        self.security = security or BusSecurity()
        # The same ZeroMQ context seen through pyzmq's blocking API (it does not own the context).
        self._plain_context = zmq.Context.shadow(context.underlying)

    def make(self, socket_type: int, *, server: bool) -> zmq.asyncio.Socket:
        return self._configure(self.context.socket(socket_type), socket_type, server=server)

    def make_plain(self, socket_type: int, *, server: bool) -> zmq.Socket[bytes]:
        """A socket without pyzmq's asyncio layer (a Future and poll-state checks per call), for the
        bus's hot paths that never wait on it: PUB sends that never block, and a SUB read from the
        event loop's own reader callback (exo/bus/transport.py)."""
        return self._configure(self._plain_context.socket(socket_type), socket_type, server=server)

    def _configure(self, socket: _AnySocket, socket_type: int, *, server: bool) -> _AnySocket:
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
        socket.setsockopt(zmq.RCVHWM, RECEIVE_HIGH_WATER_MARK)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        if socket_type == zmq.ROUTER:
            # An unroutable reply (the asker is gone) is dropped instead of raising.
            socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        apply_curve(socket, self.security, server=server)
        return socket


def bind_ephemeral(socket: zmq.Socket[bytes], host: str) -> int:
    """Bind to a free port on `host` and return it."""
    return socket.bind_to_random_port(f"tcp://{host}")
