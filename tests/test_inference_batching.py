"""Continuous batching and admission: scheduler decisions, batched output equal to each request
alone (in process and through real runners), busy refusals that disturb nothing, and the 503."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import cast

import mlx.core as mx
import msgspec
import numpy as np
import pytest
from litestar.testing import TestClient
from tokenizers import Tokenizer

from exo.api.app import create_app
from exo.api.cluster_port import Overloaded
from exo.core.events import ShardAssignment
from exo.core.sampling import SamplingParams
from exo.core.state import Instance, RunnerInfo, State
from exo.inference.batching import enable_row_attention, forward_chunks
from exo.inference.client import GenerationError, GenerationRequest, PipelineClient, TokenSink
from exo.inference.pass_threads import PassThreads
from exo.inference.protocol import (
    ActivationsSent,
    BatchRow,
    GenerationCancelled,
    GenerationFailed,
    GenerationStarted,
    RunnerStats,
    TokenSampled,
    control_from_runner_decoder,
    encode,
    pipeline_decoder,
)
from exo.inference.runner import parse_arguments, runner_command
from exo.inference.scheduler import AdmissionQueue, StageScheduler, Work, group_prefills, micro_batch_limit
from exo.inference.shard import ShardSpec, load_shard
from exo.node.generation import PipelineGenerator
from tests.harness.fakes import FakeNodeServices
from tests.harness.inference_helpers import (
    ControlServer,
    RunnerProcess,
    load,
    spawn_runner,
    stop_runners,
    tiny_models,
    wait_for_stats,
)
from tests.harness.prompts import TEXTS
from tests.harness.wired_pipeline import WiredPipeline, generate_alone

MAX_TOKENS = 16
ONE_STAGE = [(0, 6)]
TWO_STAGES = [(0, 3), (3, 6)]


def prompts(model: Path) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    return [tokenizer.encode(text).ids for text in TEXTS]


# --- scheduler and admission (sans-IO) ----------------------------------------------------------


def chunk(request_id: str, step: int = 0, *, sample: bool = False) -> Work:
    return Work(request_id, step, None, sample=sample)


def single(request_id: str, step: int) -> Work:
    return Work(request_id, step, None, sample=True, batchable=True)


def test_scheduler_alternates_prefill_chunks_with_batches_of_steps() -> None:
    scheduler = StageScheduler()
    for request_id in "abc":
        scheduler.submit(single(request_id, 5))
    scheduler.submit(chunk("new"))
    scheduler.submit(chunk("new"))
    scheduler.submit(single("new", 0))  # its last prompt token: only after its chunks
    # a prefill chunk and the waiting steps take turns; steps are batched, oldest first
    assert [work.request_id for work in scheduler.next_batch(8)] == ["new"]
    assert [work.request_id for work in scheduler.next_batch(8)] == ["a", "b", "c"]
    assert [work.request_id for work in scheduler.next_batch(8)] == ["new"]
    for request_id in "abc":
        scheduler.submit(single(request_id, 6))
    assert [work.request_id for work in scheduler.next_batch(2)] == ["new", "a"]  # the limit holds
    assert [(work.request_id, work.step) for work in scheduler.next_batch(8)] == [("b", 6), ("c", 6)]
    assert scheduler.next_batch(8) == [] and len(scheduler) == 0


def test_scheduler_never_runs_a_request_out_of_order_and_drops_all_of_it() -> None:
    scheduler = StageScheduler()
    scheduler.submit(chunk("a"))
    scheduler.submit(single("a", 0))
    scheduler.submit(single("b", 3))
    assert scheduler.next_batch(8) == [chunk("a")]
    assert [work.request_id for work in scheduler.next_batch(8)] == ["a", "b"]  # by arrival
    scheduler.submit(chunk("c"))
    scheduler.submit(single("c", 0))
    assert scheduler.drop_request("c") == 2
    assert scheduler.drop_request("c") == 0
    assert len(scheduler) == 0 and scheduler.next() is None


def test_waiting_prompt_chunks_are_grouped_within_the_limits() -> None:
    def prompt_chunk(request_id: str, tokens: int, *, sample: bool = False) -> Work:
        return Work(request_id, 0, None, sample=sample, batchable=sample and tokens == 1, tokens=tokens)

    chunks = [
        prompt_chunk(name, tokens) for name, tokens in zip("abcdef", (30, 32, 6, 28, 31, 29), strict=True)
    ]
    # "c" would make the group mostly padding; the limit and the padded budget hold
    assert [work.request_id for work in group_prefills(chunks, 8, 2048)] == ["a", "b", "d", "e", "f"]
    assert [work.request_id for work in group_prefills(chunks, 3, 2048)] == ["a", "b", "d"]
    assert [work.request_id for work in group_prefills(chunks, 8, 64)] == ["a", "b"]
    assert [work.request_id for work in group_prefills(chunks, 8, 31)] == ["a"]
    # a sampled chunk (a prompt's last token on a later stage, or an unbatched step) runs alone
    sampled = prompt_chunk("s", 4, sample=True)
    assert group_prefills([sampled, *chunks], 8, 2048) == [sampled]
    assert [work.request_id for work in group_prefills([chunks[0], sampled, chunks[1]], 8, 2048)] == [
        "a",
        "b",
    ]
    # the scheduler takes the group in one turn, then the steps waiting
    scheduler = StageScheduler()
    scheduler.submit(single("x", 3))
    for work in chunks:
        scheduler.submit(work)
    assert [work.request_id for work in scheduler.next_batch(8, 2048)] == ["a", "b", "d", "e", "f"]
    assert [work.request_id for work in scheduler.next_batch(8, 2048)] == ["x"]
    assert [work.request_id for work in scheduler.next_batch(8, 2048)] == ["c"]


def test_blas_threads_drop_to_one_for_batched_steps_only() -> None:
    calls: list[int] = []
    threads = PassThreads(calls.append, default=2, batched=1)
    for rows, tokens in [(1, 1), (8, 1), (8, 1), (1, 40), (3, 30), (4, 1), (1, 1)]:
        threads.before_pass(rows, tokens)
    assert calls == [1, 2, 1, 2]  # set only when the count changes
    with pytest.raises(ValueError, match="positive"):
        PassThreads(calls.append, default=2, batched=0)


def test_chunks_and_caches_must_match() -> None:
    model = tiny_models()["llama"]
    shard = load_shard(model, ShardSpec(0, 6, 6))
    assert enable_row_attention(shard)
    with pytest.raises(ValueError, match="cannot go with"):
        forward_chunks(shard, [], [])
    with pytest.raises(ValueError, match="cannot go with"):
        forward_chunks(shard, [mx.array([[1, 2]])], [shard.make_cache(), shard.make_cache()])


def test_micro_batches_split_the_active_requests_over_the_stages() -> None:
    assert micro_batch_limit(32, 8, 1) == 32
    assert micro_batch_limit(32, 8, 2) == 4
    assert micro_batch_limit(32, 7, 3) == 3
    assert micro_batch_limit(2, 8, 2) == 2
    assert micro_batch_limit(32, 1, 3) == 1


def test_admission_queue_admits_in_arrival_order_and_refuses_past_the_queue() -> None:
    queue: AdmissionQueue[str] = AdmissionQueue(max_active=2, max_waiting=2)
    assert [queue.offer(name, name) for name in "abcde"] == [
        "admitted", "admitted", "waiting", "waiting", "refused",
    ]  # fmt: skip
    assert queue.refused == 1 and "c" in queue and "e" not in queue
    assert queue.admit_waiting() == []  # nobody left yet
    assert queue.end("c")  # a waiting request cancelled
    assert queue.end("a")
    assert queue.admit_waiting() == ["d"]
    assert queue.offer("f", "f") == "waiting"  # the queue is not jumped while others wait
    assert not queue.end("zzz")
    with pytest.raises(ValueError, match="already"):
        queue.offer("b", "b")
    with pytest.raises(ValueError):
        AdmissionQueue[str](max_active=0, max_waiting=1)


# --- batched output equals each request alone (in process) --------------------------------------


@pytest.mark.parametrize(
    ("architecture", "splits", "batch"),
    [("llama", ONE_STAGE, 8), ("llama", TWO_STAGES, 4), ("qwen2", ONE_STAGE, 8)],
)
def test_eight_concurrent_requests_each_get_what_they_get_alone(
    architecture: str, splits: list[tuple[int, int]], batch: int
) -> None:
    model = tiny_models()[architecture]
    asked = prompts(model)
    alone = generate_alone(model, splits, asked, MAX_TOKENS)
    assert len({token for answer in alone for token in answer}) > 20, "outputs should vary to mean much"

    pipeline = WiredPipeline(model, splits, prefix_cache_tokens=0)
    for position, prompt in enumerate(asked):
        pipeline.start(f"r{position}", prompt, MAX_TOKENS)
    pipeline.run()

    assert [pipeline.tokens(f"r{position}") for position in range(len(asked))] == alone
    for stage in pipeline.stages.values():
        # all eight decode together (two micro-batches of four over two stages)
        assert stage.counters.largest_batch == batch
        assert stage.counters.batched_rows > stage.counters.batched_steps > MAX_TOKENS // 2
    assert pipeline.idle()


@pytest.mark.parametrize(
    ("architecture", "splits"), [("llama", ONE_STAGE), ("llama", TWO_STAGES), ("qwen2", ONE_STAGE)]
)
def test_prompts_prefilled_together_each_get_what_they_get_alone(
    architecture: str, splits: list[tuple[int, int]]
) -> None:
    """Prompts of different lengths (padded in a shared pass) give the tokens each gives alone with
    the same chunking; a prefix cache hit (a cache that starts full) groups as well."""
    model = tiny_models()[architecture]
    asked = prompts(model)
    asked = [*asked, asked[2] + asked[4]]  # its first part is a prefix cache entry below
    alone: list[list[int]] = []
    for position, prompt in enumerate(asked):
        single_pipeline = WiredPipeline(model, splits, prefix_cache_tokens=0, prefill_step_size=64)
        single_pipeline.start(f"alone-{position}", prompt, MAX_TOKENS)
        single_pipeline.run()
        alone.append(single_pipeline.tokens(f"alone-{position}"))

    pipeline = WiredPipeline(model, splits, prefill_step_size=64)
    pipeline.start("earlier", asked[2], 1)  # leaves asked[2] (and its first token) cached
    pipeline.run()
    for position, prompt in enumerate(asked):
        pipeline.start(f"r{position}", prompt, MAX_TOKENS)
    pipeline.run()

    assert [pipeline.tokens(f"r{position}") for position in range(len(asked))] == alone
    assert pipeline.first.counters.prefix_cache_hits >= 1
    for stage in pipeline.stages.values():
        assert stage.counters.grouped_prompt_chunks >= 4
    assert pipeline.idle()


def test_malformed_batches_are_dropped_and_counted() -> None:
    pipeline = WiredPipeline(tiny_models()["llama"], TWO_STAGES, prefix_cache_tokens=0)
    for request_id in ("a", "b"):
        pipeline.start(request_id, [5, 6, 7], 100)
    pipeline.deliver()  # both started on both stages
    last = pipeline.stages[pipeline.route[1]]
    rows = np.zeros((2, 1, 128), dtype=np.float32)

    def batch_frames(shape: list[int], batch: list[BatchRow], sample: bool = True) -> list[bytes]:
        header = ActivationsSent(
            request_id="a", step=1, shape=shape, dtype="float32", sample=sample, batch=batch
        )
        return [encode(header), np.zeros(shape, dtype=np.float32).tobytes()]

    bad = [
        batch_frames([3, 1, 128], [BatchRow("b", 1)]),  # more rows than requests
        batch_frames([2, 1, 128], [BatchRow("a", 1)]),  # the same request twice
        batch_frames([2, 2, 128], [BatchRow("b", 1)]),  # a batch is one token per request
        batch_frames([2, 1, 128], [BatchRow("b", 1)], sample=False),  # and always sampled
        [batch_frames([2, 1, 128], [BatchRow("b", 1)])[0], rows[:1].tobytes()],  # buffer too short
    ]
    queued = len(last.scheduler)
    for frames in bad:
        assert last.handle_frames(frames) == []
    assert last.counters.dropped_frames == len(bad) and len(last.scheduler) == queued
    # a good batch with one request this stage does not hold: that row is stale, the other runs
    assert last.handle_frames(batch_frames([2, 1, 128], [BatchRow("gone", 1)])) == []
    assert last.counters.stale_frames == 1 and len(last.scheduler) == queued + 1


# --- admission: busy refusals disturb nothing ---------------------------------------------------


def test_past_the_queue_requests_are_refused_busy_and_running_ones_are_undisturbed() -> None:
    model = tiny_models()["llama"]
    asked = prompts(model)[:5]
    alone = generate_alone(model, TWO_STAGES, asked, MAX_TOKENS)
    pipeline = WiredPipeline(
        model,
        TWO_STAGES,
        prefix_cache_tokens=0,
        max_active_requests=2,
        max_waiting_requests=2,
        retry_after=2.5,
    )
    for position, prompt in enumerate(asked):
        pipeline.start(f"r{position}", prompt, MAX_TOKENS)
    pipeline.deliver()
    first = pipeline.first
    assert set(first.requests) == {"r0", "r1"} and list(first.admission.waiting) == ["r2", "r3"]
    assert set(pipeline.stages[pipeline.route[1]].requests) == {"r0", "r1"}  # waiting ones go nowhere
    [refused] = pipeline.messages("r4", GenerationFailed)
    assert refused.code == "busy" and refused.retry_after == 2.5 and "busy" in refused.reason
    assert "r2" in first.requests_by_requester()["tcp://requester"]  # waiting ones are announced alive
    pipeline.send(pipeline.route[0], GenerationCancelled(request_id="r3"))  # leaves the queue
    pipeline.run()

    assert [pipeline.tokens(f"r{position}") for position in range(3)] == alone[:3]
    assert pipeline.tokens("r3") == [] and pipeline.tokens("r4") == []
    assert first.admission.refused == 1 and pipeline.idle() and not first.admission.waiting


# --- real runners ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def control() -> Iterator[ControlServer]:
    server = ControlServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def runners(control: ControlServer) -> Iterator[dict[str, list[RunnerProcess]]]:
    """ "two": a 2-stage llama pipeline; "tight": one stage that runs 1 request and queues 1."""
    model = tiny_models()["llama"]
    launched = {
        "two": [spawn_runner(control), spawn_runner(control)],
        "tight": [
            spawn_runner(
                control, "--max-active-requests", "1", "--max-waiting-requests", "1", "--retry-after", "3"
            )
        ],
    }
    try:
        for runner, (start, end) in zip(launched["two"], TWO_STAGES, strict=True):
            assert load(control, runner, model, start, end).__class__.__name__ == "ShardLoaded"
        assert load(control, launched["tight"][0], model, 0, 6).__class__.__name__ == "ShardLoaded"
        yield launched
    finally:
        stop_runners(control, [runner for group in launched.values() for runner in group])


@contextlib.asynccontextmanager
async def pipeline_client() -> AsyncGenerator[PipelineClient, None]:
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)
    try:
        yield client
    finally:
        await client.close()
        await sink.close()


async def generate(client: PipelineClient, route: list[str], request: GenerationRequest) -> list[int]:
    async with contextlib.aclosing(client.generate(route, request)) as tokens:
        return [sampled.token async for sampled in tokens]


@pytest.mark.slow
async def test_runners_batch_concurrent_requests_and_each_gets_what_it_gets_alone(
    runners: dict[str, list[RunnerProcess]], control: ControlServer
) -> None:
    route = [runner.activation_address for runner in runners["two"]]
    requests = [GenerationRequest(prompt, MAX_TOKENS, []) for prompt in prompts(tiny_models()["llama"])]
    async with pipeline_client() as client:
        alone = [await generate(client, route, request) for request in requests]
        together = await asyncio.gather(*(generate(client, route, request) for request in requests))
    assert list(together) == alone
    for runner in runners["two"]:
        stats = wait_for_stats(control, runner, "stats.active_requests == 0 and stats.queued_work == 0")
        assert stats.largest_batch >= 2 and stats.batched_steps > 0


@pytest.mark.slow
async def test_runner_refuses_past_its_queue_with_busy_and_finishes_the_others(
    runners: dict[str, list[RunnerProcess]], control: ControlServer
) -> None:
    route = [runners["tight"][0].activation_address]
    model = tiny_models()["llama"]
    # The running request is long: the waiting one must still be waiting when the runner's stats
    # (every 0.2 s) are read, and since steps overlap their graph building, 40 tiny-model tokens
    # could all be done by then.
    first_prompt, second_prompt, third_prompt = prompts(model)[:3]
    running = GenerationRequest(first_prompt, 1000, [])
    waiting, refused = GenerationRequest(second_prompt, 40, []), GenerationRequest(third_prompt, 40, [])
    async with pipeline_client() as client:
        alone = [await generate(client, route, request) for request in (running, waiting)]
        first_token = asyncio.Event()

        async def run_first() -> list[int]:
            tokens: list[int] = []
            async with contextlib.aclosing(client.generate(route, running)) as stream:
                async for sampled in stream:
                    tokens.append(sampled.token)
                    first_token.set()
            return tokens

        first = asyncio.create_task(run_first())
        await first_token.wait()
        second = asyncio.create_task(generate(client, route, waiting))
        await asyncio.to_thread(wait_for_stats, control, runners["tight"][0], "stats.waiting_requests == 1")
        with pytest.raises(GenerationError) as raised:
            await generate(client, route, refused)
        assert raised.value.code == "busy" and raised.value.retry_after == 3.0
        assert await first == alone[0] and await second == alone[1]


# --- from the runner to the HTTP answer -----------------------------------------------------------


class BusyClient:
    """A PipelineClient stand-in whose instance refused the request as busy."""

    async def generate(
        self, route: list[str], request: GenerationRequest
    ) -> AsyncGenerator[TokenSampled, None]:
        raise GenerationError("r", "instance busy: 1 requests running and 1 waiting", "busy", 2.5)
        yield  # an async generator, as the real one


async def test_a_busy_refusal_becomes_overloaded() -> None:
    fake = FakeNodeServices()
    ready = RunnerInfo(status="ready", activation_address="tcp://stage0")
    instance = Instance(
        instance_id="i-1", model_id="exo-tiny", sharding="Pipeline", status="ready",
        shard_assignments={"node0": ShardAssignment(0, 8, 8)}, runners={"node0": ready},
    )  # fmt: skip
    generator = PipelineGenerator(cast(PipelineClient, BusyClient()), fake.tokenizer, State)
    with pytest.raises(Overloaded) as raised:
        async for _ in generator.generate(instance, [1, 2], SamplingParams(), 4):
            pass
    assert raised.value.retry_after_s == 2.5 and "busy" in str(raised.value)


def test_overloaded_is_a_503_with_the_openai_error_and_retry_after() -> None:
    fake = FakeNodeServices()
    fake.script = [Overloaded("i-1", "instance busy: 64 requests running and 64 waiting", 2.5)]
    with TestClient(create_app(fake)) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"  # whole seconds, rounded up
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "overloaded" and "busy" in error["message"]


def test_runner_flags_round_trip_and_bad_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    command = runner_command(
        "tcp://127.0.0.1:1", "r", max_active_requests=3, max_waiting_requests=0, max_batch_size=1,
        prefix_cache_tokens=0,
    )  # fmt: skip
    options = parse_arguments(command[3:])
    assert (options.max_active_requests, options.max_waiting_requests) == (3, 0)
    assert (options.max_batch_size, options.prefix_cache_tokens) == (1, 0)
    assert parse_arguments([*command[3:], "--batch-threads", "2"]).batch_threads == 2
    assert options.batch_threads == 1
    for bad in (
        ["--max-batch-size", "0"],
        ["--max-waiting-requests", "-1"],
        ["--prefix-cache-tokens", "-5"],
        ["--batch-threads", "0"],
        ["--threads", "0"],
    ):
        with pytest.raises(SystemExit):
            parse_arguments(["--control", "tcp://127.0.0.1:1", *bad])
    assert "must be positive" in capsys.readouterr().err


def test_frames_without_the_new_fields_still_decode() -> None:
    """Batching, admission and the prefix cache only added optional fields and new messages."""
    old_frames = [
        {"type": "GenerationStarted", "request_id": "r", "route": ["tcp://a"], "reply_to": "tcp://b",
         "prompt_tokens": [1], "max_tokens": 2, "eos_token_ids": []},
        {"type": "ActivationsSent", "request_id": "r", "step": 0, "shape": [1, 1, 4], "dtype": "float32"},
        {"type": "TokenSampled", "request_id": "r", "step": 0, "token": 3},
        {"type": "GenerationFailed", "request_id": "r", "reason": "stage busy"},
    ]  # fmt: skip
    started, activations, sampled, failed = (
        pipeline_decoder.decode(msgspec.msgpack.encode(frame)) for frame in old_frames
    )
    assert (
        isinstance(started, GenerationStarted) and started.prefix_entry is None and started.cached_tokens == 0
    )
    assert isinstance(activations, ActivationsSent) and activations.batch == []
    assert isinstance(sampled, TokenSampled) and sampled.cached_tokens is None
    assert isinstance(failed, GenerationFailed) and failed.code is None and failed.retry_after is None
    stats = {
        "type": "RunnerStats", "instance_id": "i", "steps_done": 1, "tokens_sampled": 1,
        "active_requests": 0, "queued_work": 0, "dropped_frames": 0, "stale_frames": 0, "resident_bytes": 1,
        "peak_resident_bytes": 1,
    }  # fmt: skip
    decoded = control_from_runner_decoder.decode(msgspec.msgpack.encode(stats))
    assert isinstance(decoded, RunnerStats) and decoded.largest_batch == 0 and decoded.prefix_cache_hits == 0
    with pytest.raises(msgspec.ValidationError):  # and the new ones are validated like the rest
        pipeline_decoder.decode(msgspec.msgpack.encode({**old_frames[3], "code": "tired"}))
