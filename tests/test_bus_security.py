"""The cluster secret: same secret, one cluster; a wrong secret or a plain socket achieves nothing."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import zmq

from exo.bus.security import cluster_tag, derive_security
from exo.core import messages as m
from exo.core.models import ModelInfo
from exo.core.security import CLUSTER_KEYS_ENVIRONMENT, BusSecurity
from exo.node.worker import Worker
from tests.harness.cluster_harness import LoopbackCluster, wait_until

pytestmark = pytest.mark.slow

SECRET = "correct horse battery staple"


def test_keys_and_tags_are_derived_deterministically_and_differ_per_secret() -> None:
    first, again, other = derive_security(SECRET), derive_security(SECRET), derive_security("other")
    assert first == again and first.enabled
    assert first.public_key != other.public_key
    assert derive_security(None).enabled is False
    tag = cluster_tag(SECRET)
    assert tag is not None and SECRET not in tag and tag != cluster_tag("other")
    assert first.secret_key is not None and first.secret_key.decode() not in (tag or "")


def test_runners_get_the_key_pair_not_the_secret() -> None:
    """The worker hands its runners the derived keys in the environment; they come back unchanged,
    an unset value is an open bus, and anything else is refused with a clear error."""
    security = derive_security(SECRET)
    value = security.environment_value()
    assert value is not None and SECRET not in value
    assert BusSecurity.from_environment_value(value) == security
    assert BusSecurity.from_environment_value(None) == BusSecurity() == BusSecurity.from_environment_value("")
    assert BusSecurity().environment_value() is None
    for bad in ("one-key-only", f"{value} extra", "short short"):
        with pytest.raises(ValueError, match=CLUSTER_KEYS_ENVIRONMENT):
            BusSecurity.from_environment_value(bad)


def no_model(model_id: str) -> ModelInfo:
    raise LookupError(model_id)


def test_the_worker_passes_keys_and_drops_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXO_CLUSTER_SECRET", SECRET)
    monkeypatch.setenv(CLUSTER_KEYS_ENVIRONMENT, "stale")
    worker = Worker("n", no_model, lambda events: None, security=derive_security(SECRET))
    environment = worker.runner_environment
    assert "EXO_CLUSTER_SECRET" not in environment
    assert BusSecurity.from_environment_value(environment[CLUSTER_KEYS_ENVIRONMENT]) == derive_security(
        SECRET
    )
    open_worker = Worker("n", no_model, lambda events: None)
    assert CLUSTER_KEYS_ENVIRONMENT not in open_worker.runner_environment


def test_wrong_secret_and_plain_sockets_cannot_join_or_inject(tmp_path: Path) -> None:
    with LoopbackCluster(tmp_path, 3) as cluster:
        good, also_good, intruder = cluster.nodes
        for node in (good, also_good):
            node.extra_args = ["--cluster-secret", SECRET]
        intruder.extra_args = ["--cluster-secret", "a guess"]
        cluster.start_all()
        state = wait_until(
            lambda: (
                (s := cluster.converged([good, also_good]))
                and sum(n["status"] == "alive" for n in s["nodes"].values()) == 2
                and s
            ),
            90,
            "the two nodes with the secret formed a cluster",
        )
        assert set(state["nodes"]) == {"node0", "node1"}
        intruder_state = intruder.state()
        assert set(intruder_state["nodes"]) <= {"node2"}
        before = good.state()

        # Plain ZeroMQ, no keys at all: a hello, events and garbage go nowhere.
        context = zmq.Context()
        try:
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"tcp://127.0.0.1:{good.bus_port}")
            hello = m.RequestEnvelope(1, m.HelloRequested(node_id="plain", bus_port=1))
            dealer.send(msgspec.msgpack.encode(hello))
            dealer.send(b"garbage")
            assert not dealer.poll(1500), "a node answered a client without the cluster key"
            # A client that knows a public key but not the secret key behind it is refused too.
            wrong = derive_security("a guess")
            curious = context.socket(zmq.DEALER)
            curious.setsockopt(zmq.LINGER, 0)
            assert wrong.public_key is not None and wrong.secret_key is not None
            curious.curve_publickey, curious.curve_secretkey = wrong.public_key, wrong.secret_key
            curious.curve_serverkey = derive_security(SECRET).public_key
            curious.connect(f"tcp://127.0.0.1:{good.bus_port}")
            curious.send(msgspec.msgpack.encode(hello))
            assert not curious.poll(1500), "a node answered a client with another cluster's key"
        finally:
            context.destroy(linger=0)

        after = wait_until(good.state, 5, "the node still answers")
        assert set(after["nodes"]) == set(before["nodes"]) == {"node0", "node1"}
        assert after["master_node_id"] == before["master_node_id"]
        assert good.get("/health") and intruder.get("/health")


def test_pipeline_under_a_secret_serves_and_ignores_plain_sockets(tmp_path: Path) -> None:
    from exo.inference.protocol import GenerationStarted, encode

    with LoopbackCluster(tmp_path, 2, ["--cluster-secret", SECRET]) as cluster:
        cluster.start_all()
        first = cluster.nodes[0]
        wait_until(
            lambda: (
                (s := cluster.converged())
                and sum(n["status"] == "alive" for n in s["nodes"].values()) == 2
                and s
            ),
            90,
            "two nodes with the secret",
        )
        placed = first.post(
            "/place_instance", {"model_id": "exo-tiny", "sharding": "Pipeline", "min_nodes": 2}
        )
        assert placed.status_code == 200, placed.text
        instance_id = placed.json()["instance_id"]
        instance = wait_until(
            lambda: (i := first.get(f"/instance/{instance_id}"))["status"] == "ready" and i,
            60,
            "2 stages ready",
        )
        body = {"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        answer = first.post("/v1/chat/completions", body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1

        # A plain socket that knows a stage's address still gets nothing out of it.
        stage_address = next(iter(instance["runners"].values()))["activation_address"]
        context = zmq.Context()
        try:
            sink = context.socket(zmq.PULL)
            sink_port = sink.bind_to_random_port("tcp://127.0.0.1")
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(stage_address)
            started = GenerationStarted(
                request_id="intruder",
                route=[stage_address],
                reply_to=f"tcp://127.0.0.1:{sink_port}",
                prompt_tokens=[1, 2, 3],
                max_tokens=3,
                eos_token_ids=[],
            )
            push.send(encode(started), zmq.NOBLOCK)  # queued: the CURVE handshake never completes
            assert not sink.poll(2000), "a stage answered a socket without the cluster key"
        finally:
            context.destroy(linger=0)
