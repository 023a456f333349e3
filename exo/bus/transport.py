"""The bus shell: ROUTER on the well-known port, PUB on an announced port, SUB and DEALER per peer.

It knows sockets and frames, not cluster logic: decoded messages go to handlers the node
registers, and every frame that fails to decode is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from exo.bus.codec import DropCounter, decode_reply, decode_request, decode_topic, encode
from exo.bus.sockets import SocketFactory, bind_ephemeral
from exo.core.messages import (
    TOPIC_ELECTION,
    HelloAnswered,
    HelloRequested,
    Reply,
    ReplyEnvelope,
    Request,
    RequestEnvelope,
    RequestFailed,
)

logger = logging.getLogger(__name__)

TopicHandler = Callable[[Any], None]
RequestHandler = Callable[[Request, str], Awaitable[Reply]]
PeerHandler = Callable[[str, str], None]

HELLO_RETRY_SECONDS = 0.5
# Topics whose every message names one addressee (`to`): they go out as TOPIC/ADDRESSEE/ and each
# node subscribes to its own suffix only, so ZeroMQ drops the others' messages before Python sees
# them (Raft's messages are point to point; PUB/SUB would hand each to every node to decode).
ADDRESSED_TOPICS: frozenset[bytes] = frozenset({TOPIC_ELECTION})
ADDRESS_SEPARATOR = b"/"


def addressed_topic(topic: bytes, node_id: str) -> bytes:
    return topic + ADDRESS_SEPARATOR + node_id.encode() + ADDRESS_SEPARATOR


MAX_PENDING_REQUESTS = 1_000
_POLLIN = int(zmq.POLLIN)
# Subscription messages handled per wake of the SUB socket's reader before other callbacks run.
DRAIN_BATCH = 256


class RequestTimedOut(Exception):
    pass


@dataclass
class PeerLink:
    """A peer as seen through one bus address."""

    address: str
    dealer: zmq.asyncio.Socket
    node_id: str | None = None
    pub_address: str | None = None
    hello_task: asyncio.Task[None] | None = None
    reader_task: asyncio.Task[None] | None = None
    pending: dict[int, asyncio.Future[Reply]] = field(default_factory=dict[int, "asyncio.Future[Reply]"])


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    return host.strip("[]"), int(port)


class Bus:
    def __init__(
        self,
        node_id: str,
        factory: SocketFactory,
        *,
        bus_port: int,
        bind_host: str = "0.0.0.0",
        drops: DropCounter | None = None,
    ) -> None:
        self.node_id = node_id
        self.factory = factory
        self.bind_host = bind_host
        self.bus_port = bus_port
        self.pub_port = 0
        self.drops = drops or DropCounter()
        self._topic_handlers: dict[bytes, TopicHandler] = {}
        self._request_handler: RequestHandler | None = None
        self._peer_handlers: list[PeerHandler] = []
        self.peers: dict[str, PeerLink] = {}  # by bus address
        self._request_ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._router: zmq.asyncio.Socket | None = None
        # Plain sockets (SocketFactory.make_plain): a publish never waits, and the subscriber is read
        # from the loop's reader callback, not through a Future per message (_drain_subscriptions).
        self._publisher: zmq.Socket[bytes] | None = None
        self._subscriber: zmq.Socket[bytes] | None = None
        self._subscribed_to: dict[str, str] = {}  # node id -> pub address connected
        self.frames_received = 0
        self._answering: set[asyncio.Task[None]] = set()
        self.self_address: str | None = None
        # Addresses that turned out to be this node (a static peer list or gossip naming it): never
        # dialled again, never listed as a peer.
        self._own_addresses: set[str] = set()

    # --- set-up --------------------------------------------------------------------------------

    def on_topic(self, topic: bytes, handler: TopicHandler) -> None:
        self._topic_handlers[topic] = handler

    def on_request(self, handler: RequestHandler) -> None:
        self._request_handler = handler

    def on_peer_connected(self, handler: PeerHandler) -> None:
        """Called with (node_id, bus_address) when a hello completes."""
        self._peer_handlers.append(handler)

    async def start(self) -> None:
        self._router = self.factory.make(zmq.ROUTER, server=True)
        self._router.bind(f"tcp://{self.bind_host}:{self.bus_port}")
        self._publisher = self.factory.make_plain(zmq.PUB, server=True)
        self.pub_port = bind_ephemeral(self._publisher, self.bind_host)
        self._subscriber = self.factory.make_plain(zmq.SUB, server=False)
        for topic in self._topic_handlers:
            wanted = addressed_topic(topic, self.node_id) if topic in ADDRESSED_TOPICS else topic
            self._subscriber.setsockopt(zmq.SUBSCRIBE, wanted)
        self._tasks.append(asyncio.create_task(self._serve_requests(), name="bus-router"))
        loop = asyncio.get_running_loop()
        loop.add_reader(self._subscriber.fileno(), self._drain_subscriptions)
        self._poke_subscriptions()

    async def close(self) -> None:
        for peer in self.peers.values():
            for task in (peer.hello_task, peer.reader_task):
                if task is not None:
                    task.cancel()
        for task in self._tasks:
            task.cancel()
        tasks = [t for p in self.peers.values() for t in (p.hello_task, p.reader_task) if t is not None]
        await asyncio.gather(*self._tasks, *tasks, return_exceptions=True)
        for peer in self.peers.values():
            peer.dealer.close(linger=0)
        if self._subscriber is not None and not self._subscriber.closed:
            asyncio.get_running_loop().remove_reader(self._subscriber.fileno())
        for socket in (self._router, self._publisher, self._subscriber):
            if socket is not None:
                socket.close(linger=0)

    # --- publishing ----------------------------------------------------------------------------

    def publish(self, topic: bytes, message: msgspec.Struct) -> None:
        assert self._publisher is not None
        if topic in ADDRESSED_TOPICS:
            topic = addressed_topic(topic, getattr(message, "to", ""))
        try:
            self._publisher.send_multipart([topic, encode(message)], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.drops.drop("pub", "send queue full")

    # --- peers ---------------------------------------------------------------------------------

    def add_peer(self, address: str) -> None:
        """Connect to a peer's bus port and say hello until it answers (idempotent)."""
        if address in self._own_addresses:
            return
        peer = self.peers.get(address)
        if peer is None:
            dealer = self.factory.make(zmq.DEALER, server=False)
            dealer.connect(f"tcp://{address}")
            peer = PeerLink(address=address, dealer=dealer)
            self.peers[address] = peer
            peer.reader_task = asyncio.create_task(self._read_replies(peer), name=f"bus-dealer-{address}")
        if peer.hello_task is None or peer.hello_task.done():
            peer.hello_task = asyncio.create_task(self._hello(peer), name=f"bus-hello-{address}")

    def address_of(self, node_id: str) -> str | None:
        for peer in self.peers.values():
            if peer.node_id == node_id:
                return peer.address
        return None

    def known_addresses(self) -> list[str]:
        return sorted(address for address, peer in self.peers.items() if peer.node_id is not None)

    async def _hello(self, peer: PeerLink) -> None:
        request = HelloRequested(node_id=self.node_id, bus_port=self.bus_port)
        while True:
            try:
                reply = await self.request_address(peer.address, request, timeout=HELLO_RETRY_SECONDS * 2)
            except RequestTimedOut:
                await asyncio.sleep(HELLO_RETRY_SECONDS)
                continue
            if isinstance(reply, HelloAnswered):
                self._hello_answered(peer, reply)
                return
            await asyncio.sleep(HELLO_RETRY_SECONDS)

    def _hello_answered(self, peer: PeerLink, reply: HelloAnswered) -> None:
        if reply.node_id == self.node_id:
            # An address of our own (a static peer list that names this node): how others reach us,
            # not a peer.
            self.self_address = self.self_address or peer.address
            self._own_addresses.add(peer.address)
            self._forget(peer)
            return
        host, _ = split_address(peer.address)
        pub_address = f"tcp://{host}:{reply.pub_port}"
        peer.node_id = reply.node_id
        peer.pub_address = pub_address
        previous = self._subscribed_to.get(reply.node_id)
        if previous != pub_address:
            assert self._subscriber is not None
            if previous is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._subscriber.disconnect(previous)
            self._subscriber.connect(pub_address)
            self._subscribed_to[reply.node_id] = pub_address
            self._poke_subscriptions()
        for handler in self._peer_handlers:
            handler(reply.node_id, peer.address)

    def _forget(self, peer: PeerLink) -> None:
        """Drop a peer entry; its reader stops and its socket closes in a task that close() awaits."""
        self.peers.pop(peer.address, None)

        async def close_peer() -> None:
            if peer.reader_task is not None:
                peer.reader_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await peer.reader_task
            peer.dealer.close(linger=0)

        self._tasks.append(asyncio.create_task(close_peer(), name=f"bus-forget-{peer.address}"))

    # --- request / reply -----------------------------------------------------------------------

    async def request(self, node_id: str, body: Request, timeout: float = 2.0) -> Reply:
        address = self.address_of(node_id)
        if address is None:
            raise RequestTimedOut(f"no address known for node {node_id}")
        return await self.request_address(address, body, timeout)

    async def request_address(self, address: str, body: Request, timeout: float = 2.0) -> Reply:
        peer = self.peers[address]
        if len(peer.pending) >= MAX_PENDING_REQUESTS:
            raise RequestTimedOut(f"too many requests in flight to {address}")
        request_id = next(self._request_ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        peer.pending[request_id] = future
        try:
            await peer.dealer.send(encode(RequestEnvelope(request_id, body)), flags=zmq.NOBLOCK)
            async with asyncio.timeout(timeout):
                return await future
        except (TimeoutError, zmq.Again) as error:
            raise RequestTimedOut(f"{type(body).__name__} to {address} unanswered") from error
        finally:
            peer.pending.pop(request_id, None)

    async def _read_replies(self, peer: PeerLink) -> None:
        while True:
            frames = await peer.dealer.recv_multipart()
            self.frames_received += 1
            if len(frames) != 1:
                self.drops.drop("dealer", f"{len(frames)} frames")
                continue
            envelope = decode_reply(frames[0], self.drops, "dealer")
            if envelope is None:
                continue
            future = peer.pending.get(envelope.request_id)
            if future is not None and not future.done():
                future.set_result(envelope.body)

    async def _serve_requests(self) -> None:
        assert self._router is not None
        router = self._router
        while True:
            frames = await router.recv_multipart(copy=False)
            self.frames_received += 1
            if len(frames) != 2:
                self.drops.drop("router", f"{len(frames)} frames")
                continue
            identity, payload = frames
            envelope = decode_request(payload.bytes, self.drops, "router")
            if envelope is None:
                continue
            if len(self._answering) >= MAX_PENDING_REQUESTS:
                self.drops.drop("router", "too many requests in flight")
                continue
            peer_host = str(payload.get("Peer-Address") or "127.0.0.1")
            task = asyncio.create_task(self._answer(router, identity.bytes, envelope, peer_host))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def _answer(
        self, router: zmq.asyncio.Socket, identity: bytes, envelope: RequestEnvelope, peer_host: str
    ) -> None:
        if self._request_handler is None:
            reply: Reply = RequestFailed("no handler")
        else:
            reply = await self._request_handler(envelope.body, peer_host)
        with contextlib.suppress(zmq.Again, zmq.ZMQError):
            await router.send_multipart(
                [identity, encode(ReplyEnvelope(envelope.request_id, reply))], flags=zmq.NOBLOCK
            )

    # --- subscriptions -------------------------------------------------------------------------

    def _poke_subscriptions(self) -> None:
        """Read the subscriber soon even if its descriptor stays quiet: ZeroMQ's descriptor signals
        an edge, and any call on the socket (connect, a subscription) may consume one that frames
        arrived with."""
        asyncio.get_running_loop().call_soon(self._drain_subscriptions)

    def _drain_subscriptions(self) -> None:
        """The subscriber's reader callback: every frame queued, DRAIN_BATCH at a time (another
        batch is scheduled after other callbacks), each decoded and handed to its topic's handler,
        until ZeroMQ has nothing more and its descriptor is quiet again."""
        subscriber = self._subscriber
        if subscriber is None or subscriber.closed:
            return
        for _ in range(DRAIN_BATCH):
            try:
                frames = subscriber.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                # A receive handles ZeroMQ's queued commands only now and then, and until they are
                # handled the descriptor stays readable: the loop would call this again and again
                # while idle. Reading EVENTS handles them all (and says whether a frame came in).
                if int(subscriber.getsockopt(zmq.EVENTS)) & _POLLIN:
                    continue
                return
            except zmq.ZMQError:
                return  # closed under us (close() runs)
            self._on_subscription(frames)
        self._poke_subscriptions()

    def _on_subscription(self, frames: list[bytes]) -> None:
        self.frames_received += 1
        if len(frames) != 2:
            self.drops.drop("sub", f"{len(frames)} frames")
            return
        topic, payload = frames
        base = topic.split(ADDRESS_SEPARATOR, 1)[0]
        addressed = base in ADDRESSED_TOPICS
        if (base != topic or addressed) and topic != addressed_topic(base, self.node_id):
            self.drops.drop("sub", "addressed to another node")
            return
        message = decode_topic(base, payload, self.drops, "sub")
        if message is None:
            return
        handler = self._topic_handlers.get(base)
        if handler is None:
            return
        try:
            handler(message)
        except Exception:
            # One handler's bug must not stop the bus: the frames after it are still read.
            logger.exception(
                "handler for %s failed on %s", base.decode(errors="replace"), type(message).__name__
            )
