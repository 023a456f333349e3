"""Prefix KV cache: the first stage's index (longest prefix, budget, LRU), snapshots that never
alias, multi-turn chats that skip the shared prefix on every stage with the same output as without
the cache, and refusal of frames that would make the stages disagree."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import cast

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer

from exo.core.events import ShardAssignment
from exo.core.sampling import SamplingParams
from exo.core.state import Instance, RunnerInfo, State
from exo.inference.client import GenerationRequest, PipelineClient, TokenSink
from exo.inference.prefix_cache import KVSnapshots, PrefixIndex
from exo.inference.protocol import (
    GenerationCancelled,
    GenerationFailed,
    GenerationStarted,
    PrefixCacheConfirmed,
    PrefixCached,
    TokenSampled,
)
from exo.inference.shard import ShardSpec, load_shard
from exo.node.generation import PipelineGenerator
from tests.harness.fakes import FakeNodeServices
from tests.harness.inference_helpers import (
    N_LAYERS,
    ControlServer,
    RunnerProcess,
    load,
    spawn_runner,
    stop_runners,
    tiny_models,
    wait_for_stats,
)
from tests.harness.prompts import NEXT_USER, TURN_ONE
from tests.harness.wired_pipeline import REQUESTER, WiredPipeline

ROUTE = ["tcp://stage0", "tcp://stage1"]
MAX_TOKENS = 12


# --- the index (sans-IO) --------------------------------------------------------------------------


def confirmed_index(budget: int, entries: dict[str, list[int]]) -> PrefixIndex:
    index = PrefixIndex(budget)
    for entry_id, tokens in entries.items():
        assert index.plan_store(entry_id, ROUTE, tokens).tokens == len(tokens)
        assert index.confirm(entry_id)
    return index


def test_lookup_takes_the_longest_shared_prefix_and_always_leaves_the_last_token() -> None:
    index = confirmed_index(100, {"short": [1, 2, 3], "long": [1, 2, 3, 4, 5, 6], "other": [9, 9]})
    assert index.lookup(ROUTE, [1, 2, 3, 4, 7, 7]) == ("long", 4)
    assert index.lookup(ROUTE, [1, 2, 3, 4, 5, 6]) == ("long", 5)  # its last token is computed
    hit = index.lookup(ROUTE, [1, 2, 8])
    assert hit is not None and hit.tokens == 2  # both share two tokens
    assert index.lookup(ROUTE, [7, 1, 2]) is None
    assert index.lookup(["tcp://elsewhere"], [1, 2, 3, 4]) is None  # another route's stages lack it
    assert PrefixIndex(100, min_reuse_tokens=3).lookup(ROUTE, [1, 2, 8]) is None


def test_unconfirmed_entries_are_not_used_and_unknown_confirms_are_refused() -> None:
    index = PrefixIndex(100)
    assert index.plan_store("a", ROUTE, [1, 2, 3, 4]).tokens == 4
    assert index.lookup(ROUTE, [1, 2, 3, 4, 5]) is None
    assert index.confirm("a") and not index.confirm("nope")
    assert index.lookup(ROUTE, [1, 2, 3, 4, 5]) == ("a", 4)
    with pytest.raises(ValueError, match="exists"):
        index.plan_store("a", ROUTE, [5])


def test_the_budget_evicts_least_recently_used_and_redundant_entries() -> None:
    index = confirmed_index(10, {"a": [1, 1, 1, 1], "b": [2, 2, 2, 2]})
    assert index.lookup(ROUTE, [1, 1, 1, 1, 5]) is not None  # "a" used: "b" is now the oldest
    plan = index.plan_store("c", ROUTE, [3, 3, 3, 3])
    assert plan == (4, ["b"]) and index.tokens == 8
    # an entry that extends another replaces it; one that another already holds is not kept
    assert index.plan_store("d", ROUTE, [1, 1, 1, 1, 6]) == (5, ["a"])
    assert index.plan_store("e", ROUTE, [1, 1]) == (0, [])
    assert index.plan_store("f", ROUTE, list(range(11))) == (0, [])  # bigger than the whole budget
    assert index.plan_store("g", ROUTE, []) == (0, [])
    index.forget("d")
    assert index.tokens == 4 and "d" not in index and len(index) == 1
    with pytest.raises(ValueError):
        PrefixIndex(-1)


def test_restored_caches_grow_without_touching_the_snapshot() -> None:
    shard = load_shard(tiny_models()["llama"], ShardSpec(start_layer=0, end_layer=2, n_layers=N_LAYERS))
    cache = shard.make_cache()
    shard.forward(mx.array([[5, 6, 7, 8, 9]]), cache)
    snapshots = KVSnapshots()
    assert not snapshots.save("a", cache, 6)  # longer than the cache
    assert snapshots.save("a", cache, 4)
    kept = np.array(snapshots.restore("a", 4)[0].keys)  # type: ignore[index]
    assert snapshots.restore("a", 5) is None and snapshots.restore("nope", 1) is None
    restored = snapshots.restore("a", 3)
    assert restored is not None and restored[0].offset == 3
    shard.forward(mx.array([[1, 2, 3]]), restored)  # writes positions 3..5 of the restored cache
    assert np.array_equal(np.array(snapshots.restore("a", 4)[0].keys), kept)  # type: ignore[index]
    assert snapshots.nbytes == sum(keys.nbytes * 2 for keys, _ in snapshots._entries["a"])  # pyright: ignore[reportPrivateUsage]
    snapshots.drop(["a", "missing"])
    assert len(snapshots) == 0 and snapshots.nbytes == 0


# --- multi-turn chats through wired stages --------------------------------------------------------


def chat_turns(
    splits: list[tuple[int, int]], budget: int
) -> tuple[WiredPipeline, list[int], list[int], list[int]]:
    """Turn one, then turn two (turn one, its answer, a new question): (pipeline, prompt two,
    answer one, answer two)."""
    model = tiny_models()["llama"]
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    pipeline = WiredPipeline(model, splits, prefix_cache_tokens=budget)
    turn_one = tokenizer.encode(TURN_ONE).ids
    pipeline.start("turn-1", turn_one, MAX_TOKENS)
    pipeline.run()
    answer = pipeline.tokens("turn-1")
    turn_two = turn_one + answer + tokenizer.encode(NEXT_USER).ids
    pipeline.start("turn-2", turn_two, MAX_TOKENS)
    pipeline.run()
    return pipeline, turn_two, answer, pipeline.tokens("turn-2")


@pytest.mark.parametrize("splits", [[(0, 6)], [(0, 3), (3, 6)], [(0, 2), (2, 4), (4, 6)]])
def test_the_second_turn_skips_the_first_on_every_stage_with_the_same_output(
    splits: list[tuple[int, int]],
) -> None:
    _, _, plain_one, plain_two = chat_turns(splits, budget=0)
    pipeline, turn_two, answer, cached_two = chat_turns(splits, budget=4096)
    assert answer == plain_one and cached_two == plain_two
    # turn one's prompt and all but the last of its answer were computed already
    tokenizer = Tokenizer.from_file(str(tiny_models()["llama"] / "tokenizer.json"))
    expected = len(tokenizer.encode(TURN_ONE).ids) + MAX_TOKENS - 1
    reported = {message.cached_tokens for message in pipeline.messages("turn-2", TokenSampled)}
    assert reported == {expected} and expected < len(turn_two)
    assert {message.cached_tokens for message in pipeline.messages("turn-1", TokenSampled)} == {0}
    for stage in pipeline.stages.values():
        assert stage.counters.prefix_cache_hits == 1 and stage.counters.cached_prompt_tokens == expected
        assert set(stage.prefix.snapshots.tokens) == {"turn-2"}  # turn two's entry replaced turn one's
    assert pipeline.first.prefix.index is not None and list(pipeline.first.prefix.index.lookup(
        pipeline.route, [*turn_two, 1]
    ) or ()) == ["turn-2", len(turn_two)]  # fmt: skip
    assert pipeline.idle()


def test_evictions_reach_every_stage_and_an_unfinished_request_is_not_kept() -> None:
    model = tiny_models()["llama"]
    pipeline = WiredPipeline(model, [(0, 3), (3, 6)], prefix_cache_tokens=40)
    pipeline.start("a", list(range(1, 21)), 4)
    pipeline.run()
    assert all(set(stage.prefix.snapshots.tokens) == {"a"} for stage in pipeline.stages.values())
    pipeline.start("b", list(range(30, 50)), 4)  # 23 more tokens: "a" must go
    pipeline.run()
    assert all(set(stage.prefix.snapshots.tokens) == {"b"} for stage in pipeline.stages.values())
    pipeline.start("c", list(range(60, 80)), 1000)
    pipeline.deliver()
    for _ in range(3):
        assert pipeline.step()
    pipeline.send(pipeline.route[0], GenerationCancelled(request_id="c"))
    pipeline.run()
    assert all(set(stage.prefix.snapshots.tokens) == {"b"} for stage in pipeline.stages.values())
    assert pipeline.idle()


def test_frames_that_would_make_stages_disagree_are_refused() -> None:
    pipeline = WiredPipeline(tiny_models()["llama"], [(0, 3), (3, 6)], prefix_cache_tokens=4096)
    first, last = pipeline.stages.values()
    # a requester cannot choose a cache entry: only the first stage sets these fields
    pipeline.start("forged", [1, 2, 3, 4], 4, prefix_entry="x", cached_tokens=2)
    pipeline.deliver()
    [failed] = pipeline.messages("forged", GenerationFailed)
    assert "first stage's to set" in failed.reason and not first.requests
    # a later stage told to reuse an entry it does not hold fails the request clearly
    started = GenerationStarted(
        request_id="ghost", route=pipeline.route, reply_to=REQUESTER, prompt_tokens=[1, 2, 3, 4],
        max_tokens=4, eos_token_ids=[], stage_index=1, prefix_entry="missing", cached_tokens=2,
    )  # fmt: skip
    pipeline.send(pipeline.route[1], started)
    bad_length = GenerationStarted(
        request_id="long", route=pipeline.route, reply_to=REQUESTER, prompt_tokens=[1, 2],
        max_tokens=4, eos_token_ids=[], stage_index=1, prefix_entry="missing", cached_tokens=2,
    )  # fmt: skip
    pipeline.send(pipeline.route[1], bad_length)
    pipeline.deliver()
    assert "missing here" in pipeline.messages("ghost", GenerationFailed)[0].reason
    assert "does not fit" in pipeline.messages("long", GenerationFailed)[0].reason
    assert not last.requests
    # cache messages where they do not belong: dropped or stale, and nothing is kept
    pipeline.send(
        pipeline.route[0], PrefixCached(request_id="x", route=pipeline.route, stage_index=1, tokens=3)
    )
    pipeline.send(
        pipeline.route[1], PrefixCached(request_id="x", route=pipeline.route, stage_index=5, tokens=3)
    )
    pipeline.send(
        pipeline.route[1], PrefixCached(request_id="x", route=pipeline.route, stage_index=1, tokens=3)
    )
    pipeline.send(pipeline.route[0], PrefixCacheConfirmed(request_id="never-stored"))
    pipeline.deliver()
    assert first.counters.dropped_frames == 1 and last.counters.dropped_frames == 1
    assert first.counters.stale_frames == 1 and len(last.prefix.snapshots) == 0  # nothing to keep for "x"
    assert pipeline.received.get("x") is None


# --- real runners -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runners() -> Iterator[tuple[ControlServer, list[RunnerProcess], list[RunnerProcess]]]:
    """A 2-stage llama pipeline with the prefix cache, and one stage without it."""
    model = tiny_models()["llama"]
    control = ControlServer()
    cached = [spawn_runner(control), spawn_runner(control)]
    plain = [spawn_runner(control, "--prefix-cache-tokens", "0")]
    try:
        for runner, (start, end) in zip(cached, [(0, 3), (3, 6)], strict=True):
            assert load(control, runner, model, start, end).__class__.__name__ == "ShardLoaded"
        assert load(control, plain[0], model, 0, N_LAYERS).__class__.__name__ == "ShardLoaded"
        yield control, cached, plain
    finally:
        stop_runners(control, cached + plain)
        control.close()


async def two_turns(
    route: list[str], between_turns: Callable[[], Awaitable[object]] | None = None
) -> tuple[list[int], list[TokenSampled]]:
    """Turn one's answer, and turn two's tokens."""
    tokenizer = Tokenizer.from_file(str(tiny_models()["llama"] / "tokenizer.json"))
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)

    async def generate(prompt: list[int]) -> list[TokenSampled]:
        async with contextlib.aclosing(
            client.generate(route, GenerationRequest(prompt, MAX_TOKENS, []))
        ) as tokens:
            return [sampled async for sampled in tokens]

    try:
        turn_one = tokenizer.encode(TURN_ONE).ids
        answer = [sampled.token for sampled in await generate(turn_one)]
        if between_turns is not None:
            await between_turns()
        return answer, await generate(turn_one + answer + tokenizer.encode(NEXT_USER).ids)
    finally:
        await client.close()
        await sink.close()


@pytest.mark.slow
async def test_runners_reuse_the_first_turn_and_report_it(
    runners: tuple[ControlServer, list[RunnerProcess], list[RunnerProcess]],
) -> None:
    control, cached, plain = runners
    plain_answer, plain_two = await two_turns([plain[0].activation_address])

    def entry_confirmed() -> object:
        # The last stage confirms the entry a round trip after turn one's last token; a prompt
        # sent before that is computed in full (correct, only slower), so the test waits for it.
        return wait_for_stats(control, cached[0], "stats.prefix_cache_entries >= 1")

    answer, turn_two = await two_turns(
        [runner.activation_address for runner in cached], lambda: asyncio.to_thread(entry_confirmed)
    )
    assert answer == plain_answer
    assert [sampled.token for sampled in turn_two] == [sampled.token for sampled in plain_two]
    assert {sampled.cached_tokens for sampled in plain_two} == {0}
    tokenizer = Tokenizer.from_file(str(tiny_models()["llama"] / "tokenizer.json"))
    expected = len(tokenizer.encode(TURN_ONE).ids) + MAX_TOKENS - 1
    assert {sampled.cached_tokens for sampled in turn_two} == {expected}
    for runner in cached:
        stats = wait_for_stats(control, runner, "stats.prefix_cache_hits == 1 and stats.active_requests == 0")
        assert stats.cached_prompt_tokens == expected and stats.prefix_cache_bytes > 0


class CachedClient:
    """A PipelineClient stand-in whose tokens say 90 prompt tokens came from the prefix cache."""

    async def generate(
        self, route: list[str], request: GenerationRequest
    ) -> AsyncGenerator[TokenSampled, None]:
        yield TokenSampled(request_id="r", step=0, token=7, cached_tokens=90)
        yield TokenSampled(request_id="r", step=1, token=8, finish_reason="length", cached_tokens=90)


async def test_cached_tokens_reach_the_api_with_every_token() -> None:
    fake = FakeNodeServices()
    ready = RunnerInfo(status="ready", activation_address="tcp://stage0")
    instance = Instance(
        instance_id="i-1", model_id="exo-tiny", sharding="Pipeline", status="ready",
        shard_assignments={"node0": ShardAssignment(0, 8, 8)}, runners={"node0": ready},
    )  # fmt: skip
    generator = PipelineGenerator(cast(PipelineClient, CachedClient()), fake.tokenizer, State)
    tokens = [token async for token in generator.generate(instance, [1] * 100, SamplingParams(), 2)]
    assert [(token.token_id, token.cached_tokens) for token in tokens] == [(7, 90), (8, 90)]
