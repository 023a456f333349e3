"""Malformed frames on every socket a node binds: dropped and counted, the node stays up, state unchanged."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from exo.core import messages as m
from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, wait_until

pytestmark = pytest.mark.slow

GARBAGE: list[bytes] = [
    b"",
    os.urandom(1),
    os.urandom(64),
    os.urandom(4096),
    msgspec.msgpack.encode(m.RequestEnvelope(1, m.EventsRequested(0)))[:-3],  # truncated
    msgspec.msgpack.encode({"type": "Heartbeat", "node_id": 7}),  # wrong field type
    msgspec.msgpack.encode([1, {"type": "NoSuchRequest"}]),  # unknown tag
    msgspec.msgpack.encode("just a string"),
    msgspec.msgpack.encode([1, {"type": "EventsRequested", "since": "zero"}]),
]


def stable_state(node: NodeProcess) -> dict[str, Any]:
    state = node.state()
    for info in state["nodes"].values():
        info.pop("memory_available_bytes", None)
    return state


def raw_tcp_garbage(port: int) -> None:
    for payload in (os.urandom(32), b"\xff" * 200, b"GET / HTTP/1.0\r\n\r\n", os.urandom(3000)):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
            connection.sendall(payload)


def test_garbage_on_every_socket_is_dropped_and_counted(tmp_path: Path) -> None:
    with LoopbackCluster(tmp_path, 1) as cluster:
        node = cluster.nodes[0]
        node.start()
        wait_until(
            lambda: (s := node.state())["master_node_id"] == "node0" and "node0" in s["nodes"],
            90,
            "single node elected itself",
        )
        before = stable_state(node)
        status = node.get("/node_status")
        context = zmq.Context()
        try:
            # Raw bytes that are not even ZMTP, on the bus, PUB and API ports.
            for port in (node.bus_port, status["pub_port"], node.api_port):
                raw_tcp_garbage(port)

            # Well-formed ZMTP, malformed payloads, on the ROUTER.
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"tcp://127.0.0.1:{node.bus_port}")
            for payload in GARBAGE:
                dealer.send(payload)
            dealer.send_multipart([b"a", b"b", b"c"])

            # A fake peer whose PUB sends garbage on every topic, known and unknown.
            fake_router = context.socket(zmq.ROUTER)
            fake_port = fake_router.bind_to_random_port("tcp://127.0.0.1")
            fake_pub = context.socket(zmq.PUB)
            fake_pub_port = fake_pub.bind_to_random_port("tcp://127.0.0.1")
            hello = m.RequestEnvelope(99, m.HelloRequested(node_id="intruder", bus_port=fake_port))
            dealer.send(msgspec.msgpack.encode(hello))
            assert dealer.poll(5000), "no hello answer"
            dealer.recv()
            assert fake_router.poll(5000), "the node never said hello back"
            identity, request = fake_router.recv_multipart()
            envelope = msgspec.msgpack.decode(request, type=m.RequestEnvelope)
            answer = m.HelloAnswered(node_id="intruder", pub_port=fake_pub_port, term=0, master_node_id=None)
            fake_router.send_multipart(
                [identity, msgspec.msgpack.encode(m.ReplyEnvelope(envelope.request_id, answer))]
            )

            topics = [*m.TOPIC_TYPES, b"no_such_topic", b""]
            rng = random.Random(7)

            def flood_and_count() -> bool:
                for topic in topics:
                    for payload in GARBAGE:
                        fake_pub.send_multipart([topic, payload])
                    fake_pub.send_multipart([topic, rng.randbytes(rng.randrange(1, 300))])
                    fake_pub.send_multipart([topic, b"x", b"y"])
                drops = node.get("/node_status")["dropped_frames"]
                return any(key.startswith("sub") for key in drops) and any(
                    key.startswith("router") for key in drops
                )

            wait_until(flood_and_count, 15, "drops counted on the SUB and ROUTER sockets", interval=0.2)
        finally:
            context.destroy(linger=0)

        # Still up, still answering, state untouched.
        assert node.running
        assert node.get("/health")
        after = stable_state(node)
        assert after == before
        counts = node.get("/node_status")["dropped_frames"]
        assert sum(counts.values()) >= len(GARBAGE)
