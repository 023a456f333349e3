"""A runner about to exit from another thread than its main one tells each requester that its
requests failed (exo.inference.stage_sockets.StageBeacon.fail_requests)."""

from __future__ import annotations

import time

import zmq

from exo.inference.protocol import GenerationFailed, StageAlive, pipeline_decoder
from exo.inference.stage_sockets import FINAL_NOTICE_SECONDS, StageBeacon
from tests.harness.cluster_harness import free_port


def test_every_held_request_is_failed_to_its_requester_and_the_beats_stop() -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sink = context.socket(zmq.PULL)
    address = f"tcp://127.0.0.1:{free_port()}"
    sink.bind(address)
    beacon = StageBeacon(context, "tcp://127.0.0.1:1", interval=30.0)
    beacon.requests_by_requester = {address: ["first", "second"]}
    try:
        beacon.start()
        beacon.wake()
        alive = pipeline_decoder.decode(sink.recv())  # the beat the wake sent
        assert isinstance(alive, StageAlive) and alive.request_ids == ["first", "second"]
        assert beacon.fail_requests("tensor rank lost a peer") == 2
        got: list[GenerationFailed] = []
        while len(got) < 2:  # a beat the stop woke may come first
            assert sink.poll(5000), got
            message = pipeline_decoder.decode(sink.recv())
            assert isinstance(message, GenerationFailed | StageAlive)
            if isinstance(message, GenerationFailed):
                got.append(message)
        assert [(each.request_id, each.reason) for each in got] == [
            ("first", "stage tcp://127.0.0.1:1 failed: tensor rank lost a peer"),
            ("second", "stage tcp://127.0.0.1:1 failed: tensor rank lost a peer"),
        ]
        beacon.wake()  # stopped: no beat follows
        assert sink.poll(300) == 0
    finally:
        sink.close(linger=0)
        context.term()


def test_a_requester_that_is_gone_costs_the_exit_at_most_the_notice_bound() -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    beacon = StageBeacon(context, "tcp://127.0.0.1:1", interval=30.0)
    beacon.requests_by_requester = {f"tcp://127.0.0.1:{free_port()}": ["lost"]}  # nobody listens
    try:
        beacon.start()
        started = time.monotonic()
        assert beacon.fail_requests("tensor rank stalled") == 0
        assert time.monotonic() - started < FINAL_NOTICE_SECONDS * 3
    finally:
        context.term()
