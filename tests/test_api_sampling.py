"""The runner's per-request sampler: penalties, logit bias, min_p and log-probabilities.

Greedy sampling with none of them must stay mlx-lm's argmax (the pipeline tests check that end to
end); these check each option on hand-made logits, and that the wire messages carry them.
"""

from __future__ import annotations

import math

import mlx.core as mx
import msgspec
import pytest

from exo.core.sampling import SamplingParams
from exo.inference.protocol import GenerationStarted, TokenSampled, encode, pipeline_decoder
from exo.inference.sampling import TokenSampler, greedy, logprobs_from_logits

LOGITS = mx.array([[[2.0, 1.0, 0.5, -1.0, 3.0]]])  # token 4 is the most likely, then 0, 1, 2, 3


def draw(params: SamplingParams, count: int = 1, prompt: tuple[int, ...] = ()) -> list[int]:
    sampler = TokenSampler(params, prompt)
    return [sampler(LOGITS).token for _ in range(count)]


def test_plain_greedy_is_argmax_of_mlx_lm_logprobs() -> None:
    expected = int(greedy(logprobs_from_logits(LOGITS)).item())  # pyright: ignore[reportArgumentType]
    assert draw(SamplingParams()) == [expected] == [4]
    assert TokenSampler(SamplingParams())(LOGITS).logprob is None


def test_logprobs_are_the_models_and_sorted() -> None:
    sampled = TokenSampler(SamplingParams(logprobs=True, top_logprobs=3))(LOGITS)
    expected: list[float] = (LOGITS[0, -1] - mx.logsumexp(LOGITS[0, -1])).tolist()  # pyright: ignore[reportAssignmentType]
    assert sampled.token == 4
    assert sampled.logprob == pytest.approx(expected[4])
    assert sampled.top_logprobs is not None
    assert [token for token, _ in sampled.top_logprobs] == [4, 0, 1]
    assert all(logprob <= 0 for _, logprob in sampled.top_logprobs)
    assert [value for _, value in sampled.top_logprobs] == pytest.approx(
        [expected[4], expected[0], expected[1]]
    )
    assert TokenSampler(SamplingParams(logprobs=True))(LOGITS).top_logprobs == []


def test_logit_bias_can_ban_and_force() -> None:
    assert draw(SamplingParams(logit_bias={4: -100.0})) == [0]
    assert draw(SamplingParams(logit_bias={3: 100.0}), 3) == [3, 3, 3]
    # The reported logprob stays the model's, not the biased one.
    sampled = TokenSampler(SamplingParams(logit_bias={3: 100.0}, logprobs=True))(LOGITS)
    assert sampled.token == 3 and sampled.logprob is not None and sampled.logprob < -3


def test_frequency_and_presence_penalties_push_repeats_down() -> None:
    assert draw(SamplingParams(), 3) == [4, 4, 4]
    # 3 - 1.5 < 2, then 2 - 1.5 < 3 - 1.5
    assert draw(SamplingParams(frequency_penalty=1.5), 3) == [4, 0, 4]
    # Presence counts once: after 4, 0 and 1 are used, 4 (3 - 2.2) beats 2 (0.5) again and again.
    assert draw(SamplingParams(presence_penalty=2.2), 5) == [4, 0, 1, 4, 4]
    assert draw(SamplingParams(presence_penalty=-2.0), 3) == [4, 4, 4]


def test_repetition_penalty_covers_the_prompt() -> None:
    assert draw(SamplingParams(repetition_penalty=2.0), prompt=(4,)) == [0]  # 3 / 2 < 2
    assert draw(SamplingParams(repetition_penalty=2.0), prompt=(1,)) == [4]
    assert draw(SamplingParams(repetition_penalty=2.0), 2) == [4, 0]  # the output counts too


def test_min_p_keeps_only_tokens_near_the_top() -> None:
    # p(0) / p(4) = e^-1 ~ 0.37: min_p 0.5 leaves token 4 alone; 0.3 lets token 0 in.
    assert set(draw(SamplingParams(temperature=1.0, min_p=0.5, seed=1), 40)) == {4}
    assert set(draw(SamplingParams(temperature=1.0, min_p=0.3, seed=1), 40)) == {0, 4}


def test_seeded_sampling_with_penalties_repeats() -> None:
    params = SamplingParams(temperature=1.0, seed=5, frequency_penalty=0.5, logit_bias={2: 1.0})
    assert draw(params, 20) == draw(params, 20)


def test_new_fields_travel_and_old_frames_decode() -> None:
    sampling = SamplingParams(min_p=0.1, logit_bias={7: -100.0}, logprobs=True, top_logprobs=20)
    started = GenerationStarted(
        request_id="r",
        route=["tcp://a"],
        reply_to="tcp://b",
        prompt_tokens=[1],
        max_tokens=2,
        eos_token_ids=[],
        sampling=sampling,
    )
    assert pipeline_decoder.decode(encode(started)) == started
    old = {"type": "TokenSampled", "request_id": "r", "step": 0, "token": 5}
    decoded = pipeline_decoder.decode(msgspec.msgpack.encode(old))
    assert decoded == TokenSampled(request_id="r", step=0, token=5)
    token = TokenSampled(request_id="r", step=0, token=5, logprob=math.log(0.5), top_logprobs=[(5, -0.69)])
    assert pipeline_decoder.decode(encode(token)) == token


@pytest.mark.parametrize(
    "sampling", [{"top_logprobs": 21}, {"min_p": 1.5}, {"presence_penalty": 3}, {"logit_bias": {"1": 200.0}}]
)
def test_out_of_range_sampling_fails_validation(sampling: dict[str, object]) -> None:
    started = {
        "type": "GenerationStarted",
        "request_id": "r",
        "route": ["tcp://a"],
        "reply_to": "tcp://b",
        "prompt_tokens": [1],
        "max_tokens": 2,
        "eos_token_ids": [],
        "sampling": sampling,
    }
    with pytest.raises(msgspec.ValidationError):
        pipeline_decoder.decode(msgspec.msgpack.encode(started))
