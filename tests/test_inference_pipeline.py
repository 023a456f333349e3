"""Real runner subprocesses wired by hand into 1-, 2- and 3-stage pipelines, driven by the client."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from exo.core.sampling import SamplingParams
from exo.inference.client import GenerationError, GenerationRequest, PipelineClient, TokenSink
from tests.harness.inference_helpers import (
    ControlServer,
    RunnerProcess,
    launch_pipeline,
    mlx_lm_reference,
    stop_runners,
    tiny_models,
    wait_for_stats,
)

pytestmark = pytest.mark.slow

LONG_PROMPT = (
    "The river runs through the valley, past the old mill, and into the sea. Please summarize the "
    "following paragraph in one sentence and explain your reasoning step by step."
)
MAX_TOKENS = 24
Pipelines = dict[tuple[str, int], list[RunnerProcess]]


@pytest.fixture(scope="module")
def synthetic_models() -> dict[str, Path]:
    return tiny_models()


@pytest.fixture(scope="module")
def control() -> Iterator[ControlServer]:
    server = ControlServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def pipelines(control: ControlServer, synthetic_models: dict[str, Path]) -> Iterator[Pipelines]:
    """(architecture, stages) -> loaded runners in route order, for both models and 1-3 stages."""
    launched: Pipelines = {}
    try:
        for architecture, model in synthetic_models.items():
            for stages in (1, 2, 3):
                launched[architecture, stages] = launch_pipeline(control, model, stages)
        yield launched
    finally:
        stop_runners(control, [runner for runners in launched.values() for runner in runners])


def prompt_tokens(model: Path, text: str) -> list[int]:
    return Tokenizer.from_file(str(model / "tokenizer.json")).encode(text).ids


@pytest.fixture(scope="module")
def references(synthetic_models: dict[str, Path]) -> dict[str, dict[str, list[tuple[int, str | None]]]]:
    """architecture -> prompt name -> mlx-lm's greedy (token, finish_reason) sequence."""
    answers: dict[str, dict[str, list[tuple[int, str | None]]]] = {}
    for architecture, model in synthetic_models.items():
        long_answer, short_answer = mlx_lm_reference(
            model, [(prompt_tokens(model, LONG_PROMPT), MAX_TOKENS, []), (prompt_tokens(model, "Hi"), 8, [])]
        )
        answers[architecture] = {"long": long_answer, "short": short_answer}
    return answers


def route_of(runners: list[RunnerProcess]) -> list[str]:
    return [runner.activation_address for runner in runners]


async def collect(route: list[str], request: GenerationRequest) -> list[tuple[int, str | None]]:
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)
    try:
        async with contextlib.aclosing(client.generate(route, request)) as tokens:
            return [(sampled.token, sampled.finish_reason) async for sampled in tokens]
    finally:
        await client.close()
        await sink.close()


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
async def test_greedy_output_equals_mlx_lm(
    pipelines: Pipelines,
    synthetic_models: dict[str, Path],
    references: dict[str, dict[str, list[tuple[int, str | None]]]],
    architecture: str,
    stages: int,
) -> None:
    model = synthetic_models[architecture]
    route = route_of(pipelines[architecture, stages])
    expected = references[architecture]["long"]
    assert len({token for token, _ in expected}) > 3, "greedy output should vary for the test to mean much"

    got = await collect(route, GenerationRequest(prompt_tokens(model, LONG_PROMPT), MAX_TOKENS, []))

    assert got == expected
    assert len(got) == MAX_TOKENS and got[-1][1] == "length"  # max_tokens honoured
    short = await collect(route, GenerationRequest(prompt_tokens(model, "Hi"), 8, []))
    assert short == references[architecture]["short"]


async def test_concurrent_requests_each_equal_mlx_lm(
    pipelines: Pipelines,
    synthetic_models: dict[str, Path],
    references: dict[str, dict[str, list[tuple[int, str | None]]]],
) -> None:
    model = synthetic_models["llama"]
    route = route_of(pipelines["llama", 2])
    long_request = GenerationRequest(prompt_tokens(model, LONG_PROMPT), MAX_TOKENS, [])
    short_request = GenerationRequest(prompt_tokens(model, "Hi"), 8, [])
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)

    async def run(request: GenerationRequest) -> list[tuple[int, str | None]]:
        async with contextlib.aclosing(client.generate(route, request)) as tokens:
            return [(sampled.token, sampled.finish_reason) async for sampled in tokens]

    try:
        results = await asyncio.gather(run(long_request), run(short_request), run(long_request))
    finally:
        await client.close()
        await sink.close()
    expected = references["llama"]
    assert results == [expected["long"], expected["short"], expected["long"]]


async def test_eos_ends_generation_with_stop(
    pipelines: Pipelines,
    synthetic_models: dict[str, Path],
    references: dict[str, dict[str, list[tuple[int, str | None]]]],
) -> None:
    expected = [token for token, _ in references["qwen2"]["long"]]
    # the first step whose token did not appear before: generation must stop exactly there
    stop_at = next(step for step in range(3, len(expected)) if expected[step] not in expected[:step])
    eos = expected[stop_at]
    model = synthetic_models["qwen2"]
    request = GenerationRequest(prompt_tokens(model, LONG_PROMPT), MAX_TOKENS, [eos, 10_000])

    got = await collect(route_of(pipelines["qwen2", 3]), request)

    assert [token for token, _ in got] == expected[: stop_at + 1]
    assert [finish for _, finish in got] == [None] * stop_at + ["stop"]


async def test_seeded_sampling_is_reproducible(
    pipelines: Pipelines, synthetic_models: dict[str, Path]
) -> None:
    model = synthetic_models["llama"]
    route = route_of(pipelines["llama", 2])
    tokens = prompt_tokens(model, LONG_PROMPT)

    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest(
            tokens, MAX_TOKENS, [], SamplingParams(temperature=1.0, top_p=0.95, top_k=100, seed=seed)
        )

    first, again, other = [await collect(route, sampled(seed)) for seed in (7, 7, 8)]
    assert first == again
    assert first != other
    single_stage = await collect(route_of(pipelines["llama", 1]), sampled(7))
    assert single_stage == first  # where it is sampled does not matter, only the seed


async def test_cancel_frees_the_request_on_every_stage(
    pipelines: Pipelines,
    synthetic_models: dict[str, Path],
    control: ControlServer,
) -> None:
    model = synthetic_models["llama"]
    runners = pipelines["llama", 3]
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)
    try:
        request = GenerationRequest(prompt_tokens(model, LONG_PROMPT), 100_000, [])
        async with contextlib.aclosing(client.generate(route_of(runners), request)) as tokens:
            async for sampled in tokens:
                if sampled.step == 2:
                    break
    finally:
        await client.close()
        await sink.close()
    for runner in runners:
        wait_for_stats(control, runner, "stats.active_requests == 0 and stats.queued_work == 0")


async def test_finished_requests_are_freed_on_every_stage(
    pipelines: Pipelines,
    control: ControlServer,
    synthetic_models: dict[str, Path],
) -> None:
    runners = pipelines["qwen2", 3]
    got = await collect(
        route_of(runners), GenerationRequest(prompt_tokens(synthetic_models["qwen2"], "Hi"), 5, [])
    )
    assert got[-1][1] == "length"
    for runner in runners:
        wait_for_stats(control, runner, "stats.active_requests == 0 and stats.queued_work == 0")


@pytest.mark.parametrize("victim", [1, 2])
async def test_killed_stage_gives_an_error_within_seconds(
    synthetic_models: dict[str, Path],
    victim: int,
) -> None:
    control = ControlServer()
    runners = launch_pipeline(control, synthetic_models["llama"], 3)
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink, stage_timeout=3.0, token_timeout=60.0)
    request = GenerationRequest(prompt_tokens(synthetic_models["llama"], LONG_PROMPT), 1_000_000, [])
    killed_at = 0.0
    try:
        with pytest.raises(GenerationError) as raised:
            async with contextlib.aclosing(client.generate(route_of(runners), request)) as tokens:
                async for sampled in tokens:
                    if sampled.step == 3:
                        runners[victim].process.kill()
                        killed_at = time.monotonic()
        elapsed = time.monotonic() - killed_at
    finally:
        await client.close()
        await sink.close()
        stop_runners(control, runners)
        control.close()
    assert killed_at > 0
    assert elapsed < 6.0
    reason = raised.value.reason
    assert "unreachable" in reason or "stopped responding" in reason, reason
