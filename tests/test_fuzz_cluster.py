"""A running 3-node cluster takes random and mutated frames on every socket for a while.

Every socket: each node's bus (ROUTER, PUB, its subscriptions through a fake peer), its token sink,
and the activation PULL of both stages of a two-stage instance. No node or runner crashes, the state
is unchanged, the instance still answers, and the drop counters show the frames. The duration is
EXO_FUZZ_SECONDS (default: a minute, as the issue asks; shorter for a quick local run).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from exo.bus.transport import addressed_topic
from exo.core import messages as m
from exo.core.decoding import DECODE_ERRORS
from exo.core.events import IndexedEvent, NodeLabelled
from exo.core.messages import TOPIC_TYPES, Rank
from exo.core.raft_messages import EntriesAcknowledged, EntriesSent, VoteAnswered, VoteRequested
from exo.inference.frames import MalformedFrameError, decode_frames
from exo.inference.protocol import ActivationsSent, GenerationCancelled, TokenSampled, encode
from tests.harness.cluster_harness import LoopbackCluster, NodeProcess, wait_until

pytestmark = pytest.mark.slow

FUZZ_SECONDS = float(os.environ.get("EXO_FUZZ_SECONDS", "60"))

# Raft's messages travel on election/ADDRESSEE/: a node subscribes to its own only.
ELECTION_TO_NODE0 = addressed_topic(m.TOPIC_ELECTION, "node0")
# Valid frames of every kind, to mutate: the fuzzer starts from what the node expects.
SEEDS: list[tuple[bytes, bytes]] = [
    (m.TOPIC_CONNECTION, msgspec.msgpack.encode(m.Heartbeat("x", 9, "x", Rank(True, 10**9, "x"), 1))),
    (ELECTION_TO_NODE0, msgspec.msgpack.encode(VoteRequested(99, "x", "node0", 10**9, 99))),
    (ELECTION_TO_NODE0, msgspec.msgpack.encode(VoteAnswered(99, "x", "node0", True))),
    (
        ELECTION_TO_NODE0,
        msgspec.msgpack.encode(
            EntriesSent(
                99, "x", "node0", 0, 0, [IndexedEvent(1, 99, "x", 1, NodeLabelled("node0", "k", "v"))], 1
            )
        ),
    ),
    (ELECTION_TO_NODE0, msgspec.msgpack.encode(EntriesAcknowledged(99, "x", "node0", True, 10**9))),
    (
        m.TOPIC_GLOBAL_EVENTS,
        msgspec.msgpack.encode(
            m.EventsPublished(99, "x", [IndexedEvent(1, 99, "x", 1, NodeLabelled("node0", "k", "v"))])
        ),
    ),
    (m.TOPIC_LOCAL_EVENTS, msgspec.msgpack.encode(m.LocalEventsSent("x", []))),
    (m.TOPIC_COMMANDS, msgspec.msgpack.encode(m.DeleteInstance("nope"))),
]
# The same for the pipeline sockets (a stage's activation PULL, a node's token sink).
PIPELINE_SEEDS: list[list[bytes]] = [
    [encode(TokenSampled(request_id="x", step=0, token=1))],
    [encode(GenerationCancelled(request_id="x"))],
    [encode(ActivationsSent(request_id="x", step=0, shape=[1, 1, 64], dtype="float32")), bytes(256)],
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    match rng.randrange(5):
        case 0:
            return bytes(buffer[: rng.randrange(len(buffer) + 1)])  # truncated
        case 1:
            for _ in range(rng.randrange(1, 4)):
                if buffer:
                    buffer[rng.randrange(len(buffer))] = rng.randrange(256)  # flipped bytes
            return bytes(buffer)
        case 2:
            return bytes(buffer) + rng.randbytes(rng.randrange(1, 64))  # trailing junk
        case 3:
            return rng.randbytes(rng.randrange(0, 512))  # pure noise
        case _:
            return msgspec.msgpack.encode(rng.choice([None, 1, "x", [1, 2], {"type": "Heartbeat"}]))


def malformed(topic: bytes, frame: bytes) -> bool:
    """Whether the node must drop this frame. A mutation that happens to stay a valid message is a
    forgery, not a malformed frame: on an open bus anyone may send those (the cluster secret is what
    keeps strangers out, see test_bus_security.py), so the fuzzer does not send them."""
    topic = topic.split(b"/", 1)[0]  # an addressed topic (election/NODE/) holds its topic's messages
    message_type = TOPIC_TYPES.get(topic, m.RequestEnvelope) if topic != b"request" else m.RequestEnvelope
    if topic not in TOPIC_TYPES and topic != b"request":
        return True
    try:
        msgspec.msgpack.decode(frame, type=message_type)
    except DECODE_ERRORS:
        return True
    return False


def valid_pipeline_frames(frames: list[bytes]) -> bool:
    """A mutation that still decodes is a well-formed message for an unknown request (counted as
    stale, not dropped); like forged bus frames, those are not what this test sends."""
    try:
        decode_frames(frames)
    except MalformedFrameError:
        return False
    return True


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def stable(node: NodeProcess) -> dict[str, Any]:
    """The state without what legitimately moves during a minute: free memory, re-measured as it
    changes (NodeMemoryMeasured), and so the index of the last event."""
    state = node.state()
    for info in state["nodes"].values():
        info.pop("memory_available_bytes", None)
    state.pop("last_event_index", None)
    return state


class FakePeer:
    """Says hello to a node so that it subscribes to this PUB, then publishes whatever it is given."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], node: NodeProcess, name: str) -> None:
        self.router = context.socket(zmq.ROUTER)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.pub = context.socket(zmq.PUB)
        self.pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.dealer = context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(f"tcp://127.0.0.1:{node.bus_port}")
        hello = m.RequestEnvelope(1, m.HelloRequested(node_id=name, bus_port=port))
        self.dealer.send(msgspec.msgpack.encode(hello))
        assert self.router.poll(10_000), f"{node.name} never said hello back"
        identity, request = self.router.recv_multipart()
        envelope = msgspec.msgpack.decode(request, type=m.RequestEnvelope)
        answer = m.HelloAnswered(node_id=name, pub_port=self.pub_port, term=0, master_node_id=None)
        self.router.send_multipart(
            [identity, msgspec.msgpack.encode(m.ReplyEnvelope(envelope.request_id, answer))]
        )


def raw_tcp(port: int, payload: bytes) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(payload)
    except OSError:
        pass  # a node may close on garbage at once: that is the point


def test_a_minute_of_fuzzed_frames_changes_nothing(tmp_path: Path) -> None:
    with LoopbackCluster(tmp_path, 3) as cluster:
        cluster.start_all()
        before = wait_until(
            lambda: (
                (s := cluster.converged())
                and sum(n["status"] == "alive" for n in s["nodes"].values()) == 3
                and s
            ),
            90,
            "three nodes agree",
        )
        placed = cluster.nodes[0].post(
            "/place_instance", {"model_id": "exo-tiny", "sharding": "Pipeline", "min_nodes": 2}
        )
        assert placed.status_code == 200, placed.text
        instance_id = placed.json()["instance_id"]
        ready = wait_until(
            lambda: (s := cluster.converged()) and s["instances"][instance_id]["status"] == "ready" and s,
            90,
            "the two-stage instance to be ready",
        )
        stages = [
            runner["activation_address"] for runner in ready["instances"][instance_id]["runners"].values()
        ]
        assert len(stages) == 2
        before = {node.name: stable(node) for node in cluster.nodes}
        statuses = {node.name: node.get("/node_status") for node in cluster.nodes}
        sinks = [status["token_sink"]["address"] for status in statuses.values()]
        context = zmq.Context()
        rng = random.Random(1234)
        sent = 0
        try:
            peers = [FakePeer(context, node, f"fuzzer-{node.name}") for node in cluster.nodes]
            dealers = [peer.dealer for peer in peers]
            pushes = []
            for address in stages + sinks:
                push = context.socket(zmq.PUSH)
                push.setsockopt(zmq.LINGER, 0)
                push.setsockopt(zmq.SNDHWM, 100)
                push.connect(address)
                pushes.append(push)
            deadline = time.monotonic() + FUZZ_SECONDS
            while time.monotonic() < deadline:
                topic, seed = rng.choice(SEEDS)
                for peer in peers:
                    frame_topic, frame = rng.choice([topic, topic, b"junk", b""]), mutate(rng, seed)
                    if malformed(frame_topic, frame):
                        peer.pub.send_multipart([frame_topic, frame])
                for dealer in dealers:
                    request = mutate(
                        rng, msgspec.msgpack.encode(m.RequestEnvelope(7, m.EventsRequested(0, 10)))
                    )
                    if malformed(b"request", request):
                        dealer.send(request, zmq.NOBLOCK)
                for push in pushes:
                    frames = [mutate(rng, part) for part in rng.choice(PIPELINE_SEEDS)]
                    if not valid_pipeline_frames(frames):
                        with contextlib.suppress(zmq.Again):
                            push.send_multipart(frames, zmq.NOBLOCK)
                node = rng.choice(cluster.nodes)
                raw_tcp(rng.choice([node.bus_port, statuses[node.name]["pub_port"]]), mutate(rng, seed))
                raw_tcp(port_of(rng.choice(stages + sinks)), mutate(rng, seed))
                sent += 1
                time.sleep(0.002)  # pacing, so the run lasts FUZZ_SECONDS without flooding HWMs
        finally:
            context.destroy(linger=0)

        assert sent > 100
        for node in cluster.nodes:
            assert node.running, f"{node.name} died"
        after = wait_until(lambda: (s := cluster.converged()) and s, 10, "the nodes still agree")
        assert after["master_node_id"] == before["node0"]["master_node_id"]
        for node in cluster.nodes:
            assert stable(node) == before[node.name], f"{node.name}'s state changed"
            status = node.get("/node_status")
            assert status["dropped_frames_total"] > 0, f"{node.name} counted no drops"
            assert status["token_sink"]["dropped_frames"] > 0, f"{node.name}'s token sink counted no drops"
        stage_drops = wait_until(
            lambda: (
                (
                    drops := [
                        (status["runners"][instance_id]["stats"] or {}).get("dropped_frames", 0)
                        for node in cluster.nodes
                        if instance_id in (status := node.get("/node_status"))["runners"]
                    ]
                )
                and len(drops) == 2
                and all(drops)
                and drops
            ),
            10,
            "both stages to report the frames they dropped",
        )
        print(f"fuzz: {sent} rounds; dropped by the two stages: {stage_drops}")
        answer = cluster.nodes[2].post(
            "/v1/chat/completions",
            {"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] > 0
