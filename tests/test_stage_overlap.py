"""A stage launches its next pass before it finishes the one in flight (mlx-lm's async_eval
overlap); one that both embeds and samples queues a request's next step on its token before the
token is computed. These tests hold the cases where that could change what a request gets: a stop
token with a step already computed past it, a cancel while a step is in flight, penalties that
need every token before the next draw, and a failure surfacing only when a pass is finished."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from exo.core.sampling import SamplingParams
from exo.inference import stage_passes
from exo.inference.protocol import GenerationCancelled, GenerationFailed, TokenSampled
from tests.harness.inference_helpers import tiny_models
from tests.harness.wired_pipeline import WiredPipeline, generate_alone

ONE_STAGE = [(0, 6)]
TWO_STAGES = [(0, 3), (3, 6)]


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_models()["llama"]


@pytest.fixture(scope="module")
def prompt(model: Path) -> list[int]:
    return Tokenizer.from_file(str(model / "tokenizer.json")).encode("The river runs through the valley").ids


def test_the_next_step_is_queued_before_the_token_is_known_and_output_is_unchanged(
    model: Path, prompt: list[int]
) -> None:
    pipeline = WiredPipeline(model, ONE_STAGE, prefix_cache_tokens=0)
    pipeline.start("r", prompt, 8)
    fed_ahead = 0
    while pipeline.step():
        in_flight = pipeline.first.in_flight
        if in_flight is not None and in_flight.fed_ahead:
            # a sampling pass is computing, and its request's next step waits in the queue already
            assert in_flight.fed_ahead == {"r"} and len(pipeline.first.scheduler) == 1
            fed_ahead += 1
    assert fed_ahead == 7  # every step but the last (max_tokens is known in advance)
    assert pipeline.tokens("r") == generate_alone(model, TWO_STAGES, [prompt], 8)[0]
    assert pipeline.idle()


@pytest.mark.parametrize("splits", [ONE_STAGE, TWO_STAGES], ids=["1-stage", "2-stage"])
def test_a_stop_token_ends_the_answer_though_a_step_past_it_was_computed(
    model: Path, prompt: list[int], splits: list[tuple[int, int]]
) -> None:
    expected = generate_alone(model, splits, [prompt], 12)[0]
    stop_at = next(position for position in range(3, 10) if expected[position] not in expected[:position])
    eos = expected[stop_at]
    pipeline = WiredPipeline(model, splits)
    pipeline.start("r", prompt, 12, eos_token_ids=[eos])
    pipeline.run()
    sampled = pipeline.messages("r", TokenSampled)
    assert [message.token for message in sampled] == expected[: stop_at + 1]
    assert [message.finish_reason for message in sampled][-2:] == [None, "stop"]
    assert pipeline.idle()
    # The first turn's cache (with the extra step's position) serves a second turn exactly.
    follow_up = prompt + expected[: stop_at + 1] + prompt[:4]
    pipeline.start("second", follow_up, 6)
    pipeline.run()
    cached = pipeline.messages("second", TokenSampled)[0].cached_tokens
    assert cached >= len(prompt) + stop_at  # the prompt and every token fed back
    assert pipeline.tokens("second") == generate_alone(model, splits, [follow_up], 6)[0]


def test_a_cancel_while_a_step_is_in_flight_gets_no_further_token(model: Path, prompt: list[int]) -> None:
    pipeline = WiredPipeline(model, ONE_STAGE)
    pipeline.start("r", prompt, 40)
    while len(pipeline.tokens("r")) < 3:
        assert pipeline.step()
    pipeline.deliver()  # every token sent so far reaches the requester
    sent = len(pipeline.tokens("r"))
    assert pipeline.first.in_flight is not None and pipeline.first.in_flight.fed_ahead == {"r"}
    pipeline.send(pipeline.route[0], GenerationCancelled(request_id="r"))
    pipeline.run()
    assert len(pipeline.tokens("r")) == sent  # the step in flight when the cancel came is not sent
    assert pipeline.idle()
    assert not pipeline.messages("r", GenerationFailed)


def test_penalties_wait_for_each_token_and_give_what_sampling_in_turn_gives(
    model: Path, prompt: list[int]
) -> None:
    sampling = SamplingParams(temperature=0.7, seed=11, repetition_penalty=1.3, presence_penalty=0.5)
    pipeline = WiredPipeline(model, ONE_STAGE, prefix_cache_tokens=0)
    pipeline.start("r", prompt, 10, sampling=sampling)
    while pipeline.step():
        in_flight = pipeline.first.in_flight
        assert in_flight is None or not in_flight.fed_ahead
    two_stages = WiredPipeline(model, TWO_STAGES, prefix_cache_tokens=0)  # never feeds ahead
    two_stages.start("r", prompt, 10, sampling=sampling)
    two_stages.run()
    assert pipeline.tokens("r") == two_stages.tokens("r")
    assert len(set(pipeline.tokens("r"))) > 1


def test_a_pass_that_fails_when_finished_fails_its_requests_and_frees_them(
    model: Path, prompt: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = WiredPipeline(model, ONE_STAGE)
    pipeline.start("r", prompt, 20)
    while len(pipeline.tokens("r")) < 2:
        assert pipeline.step()

    def out_of_memory(*_: object) -> None:
        raise RuntimeError("[malloc] Unable to allocate")

    monkeypatch.setattr(stage_passes, "accept_rows", out_of_memory)
    pipeline.run()
    failed = pipeline.messages("r", GenerationFailed)
    assert len(failed) == 1 and "Unable to allocate" in failed[0].reason
    assert pipeline.idle()
