"""Stop strings over streamed text, and what closing a stream does to the generation."""

from __future__ import annotations

import asyncio

import pytest

from exo.api.chat import CompletionRun, stream_completion
from exo.api.fakes import FakeNodeServices, FakeTokenizer
from exo.api.stop_strings import StopStringMatcher
from exo.inference.protocol import SamplingParams
from exo.state import Instance


@pytest.mark.parametrize(
    ("stops", "pieces", "shown", "stopped"),
    [
        (["END"], ["abc", "def"], ["abc", "def"], False),
        (["END"], ["abcE", "N", "Dxyz"], ["abc", "", ""], True),  # split over three pieces
        (["END"], ["abcEN", "Q"], ["abc", "ENQ"], False),  # a false alarm is released
        (["END"], ["xEND"], ["x"], True),
        (["END"], ["END"], [""], True),
        (["\n\n", "User:"], ["Hi", "\n", "Us", "er:"], ["Hi", "", "\n", ""], True),  # earliest wins
        (["ab", "b"], ["xab"], ["x"], True),  # both match; the earlier position wins
        (["aab"], ["aa", "aab"], ["", "aa"], True),  # overlapping prefixes: "aa" + "aab" = "aa" + stop
        (["é!"], ["café", "!"], ["caf", ""], True),  # non-ASCII
    ],
)
def test_matcher_table(stops: list[str], pieces: list[str], shown: list[str], stopped: bool) -> None:
    matcher = StopStringMatcher(stops)
    assert [matcher.feed(piece) for piece in pieces] == shown
    assert matcher.stopped == stopped


def test_held_text_is_released_by_flush() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("abcEN") == "abc"
    assert matcher.flush() == "EN"
    assert matcher.flush() == ""


def test_nothing_after_a_stop() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("aEND") == "a"
    assert matcher.feed("more") == ""
    assert matcher.flush() == ""


def test_no_stop_strings_holds_nothing() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == "anything"
    assert not matcher.stopped


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        StopStringMatcher(["ok", ""])


def make_run(services: FakeNodeServices, tokenizer: FakeTokenizer) -> CompletionRun:
    instance = Instance(
        instance_id="i-1", model_id="exo-tiny", sharding="Pipeline", status="ready", shard_assignments={}
    )
    return CompletionRun(
        services=services,
        instance=instance,
        tokenizer=tokenizer,
        prompt_tokens=[1, 2, 3],
        sampling=SamplingParams(),
        max_tokens=100,
        stop_strings=[],
    )


async def test_closing_the_stream_cancels_the_generation() -> None:
    """A client that goes away: the SSE generator is closed, and it closes the token iterator."""
    services = FakeNodeServices()
    tokenizer = FakeTokenizer()
    services.script = [ord(character) for character in "a long answer"]
    stream = stream_completion(make_run(services, tokenizer), "exo-tiny", include_usage=False)
    first = await anext(stream)
    assert b'"role":"assistant"' in first
    second = await anext(stream)
    assert b'"content":"a"' in second
    await stream.aclose()
    await asyncio.wait_for(services.generation_closed.wait(), timeout=5)
    (call,) = services.generate_calls
    assert call.closed_early
    assert call.tokens_sent == 1


async def test_a_finished_stream_closes_the_generation_normally() -> None:
    services = FakeNodeServices()
    services.script = [ord("a")]
    chunks = [chunk async for chunk in stream_completion(make_run(services, FakeTokenizer()), "m", False)]
    assert chunks[-1] == b"data: [DONE]\n\n"
    (call,) = services.generate_calls
    assert call.finished
    assert not call.closed_early
    assert services.generation_closed.is_set()
