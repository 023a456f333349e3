"""A runner's sockets toward other processes that are not its worker: PUSH sockets to the next
stage and to requesters, and the heartbeat thread that tells requesters which of their requests
this stage holds (so a stage that dies is noticed in seconds)."""

from __future__ import annotations

import threading
from typing import Any

import zmq

from exo.core.security import BusSecurity, apply_curve
from exo.inference.protocol import GenerationFailed, StageAlive, encode

FINAL_NOTICE_SECONDS = 1.0  # how long a runner about to exit waits for its last notices to go out


class PushSockets:
    """PUSH sockets connected lazily, one per address; a send that cannot go out in time fails."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        send_timeout: float,
        security: BusSecurity | None = None,
    ) -> None:
        self._context = context
        self._sockets: dict[str, zmq.Socket[bytes]] = {}
        self._timeout_ms = int(send_timeout * 1000)
        self._security = security or BusSecurity()

    def send(self, address: str, frames: tuple[Any, ...]) -> bool:
        socket = self._sockets.get(address)
        if socket is None:
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a live connection, so a dead peer shows
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 10_000)
            apply_curve(socket, self._security, server=False)
            try:
                socket.connect(address)
            except zmq.ZMQError:
                socket.close()
                return False
            self._sockets[address] = socket
        if not socket.poll(self._timeout_ms, zmq.POLLOUT):
            return False
        try:
            for position, frame in enumerate(frames):
                more = zmq.SNDMORE if position < len(frames) - 1 else 0
                # the hidden state goes without a copy; headers are small enough to copy
                socket.send(frame, more | zmq.NOBLOCK, copy=position == 0)
        except zmq.ZMQError:  # Again when the peer vanished between poll and send
            return False
        return True

    def close(self, linger_ms: int = 0) -> None:
        for socket in self._sockets.values():
            socket.close(linger=linger_ms)
        self._sockets.clear()


class StageBeacon:
    """A thread sending StageAlive to each requester with requests here, every interval, and at
    once when a request arrives (so a requester knows every stage of its route within
    milliseconds, and notices any of them dying)."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        address: str,
        interval: float,
        security: BusSecurity | None = None,
    ) -> None:
        self.address = address
        self.interval = interval
        self.security = security
        self.requests_by_requester: dict[str, list[str]] = {}  # replaced whole by the main thread
        self._sockets = PushSockets(
            context, send_timeout=0.2, security=security
        )  # time to connect, not to queue
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stage-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            for reply_to, request_ids in self.requests_by_requester.items():
                message = StageAlive(stage_address=self.address, request_ids=request_ids)
                self._sockets.send(reply_to, (encode(message),))
        self._sockets.close()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def fail_requests(self, reason: str) -> int:
        """Stop beating and tell each requester that its requests here failed: for a runner about
        to exit from another thread than its main one (which may be stuck inside MLX), so through
        a context of its own, waited on until the notices are out. Returns how many went out."""
        self.stop()
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sockets = PushSockets(context, send_timeout=FINAL_NOTICE_SECONDS / 2, security=self.security)
        sent = 0
        try:
            for reply_to, request_ids in self.requests_by_requester.items():
                for request_id in request_ids:
                    failed = GenerationFailed(
                        request_id=request_id,
                        reason=f"stage {self.address} failed: {reason}",
                        stage_address=self.address,
                    )
                    sent += sockets.send(reply_to, (encode(failed),))
        finally:
            sockets.close(linger_ms=int(FINAL_NOTICE_SECONDS * 1000))
            context.term()  # returns once the notices left or the linger ran out
        return sent
