"""Rank 0's steps for the other ranks of a tensor instance (exo.inference.tensor), in process."""

from __future__ import annotations

import socket

import msgspec
import pytest

from exo.core.sampling import SamplingParams
from exo.inference.protocol import (
    GenerationCancelled,
    GenerationStarted,
    LoadShard,
    RingFormed,
    RingListening,
    RunnerFailed,
    RunnerStarted,
    StepShared,
    encode,
    pipeline_decoder,
    step_decoder,
)
from exo.inference.tensor import StepFollower, StepLeader, ring_address, with_seed
from tests.harness.inference_helpers import N_LAYERS, ControlServer, spawn_runner, stop_runners, tiny_models


def started(sampling: SamplingParams) -> GenerationStarted:
    return GenerationStarted("r-1", ["tcp://127.0.0.1:1"], "tcp://127.0.0.1:2", [1, 2, 3], 8, [0], sampling)


def test_a_random_sampling_request_without_a_seed_gets_one_so_every_rank_draws_alike() -> None:
    seeded = pipeline_decoder.decode(with_seed(encode(started(SamplingParams(temperature=0.7)))))
    assert isinstance(seeded, GenerationStarted) and seeded.sampling.seed is not None
    assert seeded.sampling.temperature == 0.7 and seeded.prompt_tokens == [1, 2, 3]
    for unchanged in (started(SamplingParams()), started(SamplingParams(temperature=0.7, seed=5))):
        assert with_seed(encode(unchanged)) == encode(unchanged)
    cancel = encode(GenerationCancelled("r-1"))
    assert with_seed(cancel) == cancel
    assert with_seed(b"\xff not msgpack") == b"\xff not msgpack"


def test_the_leader_shares_what_it_took_in_order_and_numbers_its_steps() -> None:
    leader = StepLeader(["tcp://127.0.0.1:9"])
    assert leader.next_step(run=False) is None  # nothing to tell
    leader.took(b"first")
    leader.requesters_gone(["r-2"])
    step = step_decoder.decode(leader.next_step(run=False) or b"")
    assert step == StepShared(turn=0, run=False, messages=[b"first", encode(GenerationCancelled("r-2"))])
    step = step_decoder.decode(leader.next_step(run=True) or b"")
    assert step == StepShared(turn=1, run=True, messages=[])
    assert leader.shared_bytes > 0


def test_a_follower_takes_steps_in_order_drops_strangers_and_fails_on_a_gap() -> None:
    follower = StepFollower()
    assert follower.decode([encode(StepShared(turn=0, run=True))]) == StepShared(turn=0, run=True)
    assert follower.decode([b"junk"]) is None
    assert follower.decode([encode(GenerationCancelled("x"))]) is None
    assert follower.decode([b"a", b"b"]) is None
    with pytest.raises(ValueError, match="step 2 arrived, step 1 expected"):
        follower.decode([encode(StepShared(turn=2, run=False))])


def test_step_frames_refuse_bad_fields() -> None:
    with pytest.raises(msgspec.ValidationError):
        step_decoder.decode(msgspec.msgpack.encode({"type": "StepShared", "turn": -1, "run": True}))


def test_the_ring_port_is_reserved_on_the_given_address_only() -> None:
    address = ring_address("127.0.0.1")
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    with socket.socket() as probe:  # free again: MLX binds it itself
        probe.bind(("127.0.0.1", int(port)))


def test_a_runner_refuses_a_rank_outside_its_group_and_a_ring_of_the_wrong_size() -> None:
    model = tiny_models()["llama"]
    control = ControlServer()
    runners = [spawn_runner(control), spawn_runner(control)]
    try:
        outside, wrong_ring = runners
        for runner, rank in ((outside, 2), (wrong_ring, 0)):
            control.receive(runner.runner_id, (RunnerStarted,))
            load = LoadShard("i", "tiny", str(model), 0, N_LAYERS, N_LAYERS, rank=rank, size=2)
            control.send(runner.runner_id, load)
        failed = control.receive(outside.runner_id, (RunnerFailed,))
        assert isinstance(failed, RunnerFailed) and failed.reason == "rank 2 is outside a tensor group of 2"
        listening = control.receive(wrong_ring.runner_id, (RingListening,))
        assert isinstance(listening, RingListening) and listening.ring_address.startswith("127.0.0.1:")
        hosts = [listening.ring_address, "127.0.0.1:1", "127.0.0.1:2"]
        control.send(wrong_ring.runner_id, RingFormed(hosts, [listening.activation_address] * 3))
        failed = control.receive(wrong_ring.runner_id, (RunnerFailed,))
        assert isinstance(failed, RunnerFailed)
        assert failed.reason == "ring of 3 ranks for a tensor group of 2"
    finally:
        stop_runners(control, runners)
        control.close()
