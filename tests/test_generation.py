"""PipelineGenerator: several ready instances of one model share the load; closing a stream
closes the pipeline client's generation at once (that is what cancels it on the stages)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import cast

import msgspec
import pytest

from exo.api.cluster_port import GeneratedToken, GenerationAborted
from exo.core.events import ShardAssignment
from exo.core.sampling import SamplingParams
from exo.core.state import Instance, RunnerInfo, State
from exo.inference.client import UNREACHABLE, GenerationError, GenerationRequest, PipelineClient
from exo.inference.protocol import TokenSampled
from exo.node.generation import PipelineGenerator
from tests.harness.fakes import FakeNodeServices


def instance(instance_id: str, model_id: str = "exo-tiny", status: str = "ready") -> Instance:
    runner = RunnerInfo(
        status="ready" if status == "ready" else "loading", activation_address=f"tcp://{instance_id}"
    )
    return Instance(
        instance_id=instance_id, model_id=model_id, sharding="Pipeline", status=status,  # type: ignore[arg-type]
        shard_assignments={"node0": ShardAssignment(0, 8, 8)}, runners={"node0": runner},
    )  # fmt: skip


class HeldClient:
    """Yields one token per generation, then holds it open until released; records routes."""

    def __init__(self) -> None:
        self.routes: list[str] = []
        self.closed: list[str] = []
        self.release = asyncio.Event()

    async def generate(
        self, route: list[str], request: GenerationRequest
    ) -> AsyncGenerator[TokenSampled, None]:
        self.routes.append(route[0])
        try:
            yield TokenSampled(request_id="r", step=0, token=1)
            await self.release.wait()
            yield TokenSampled(request_id="r", step=1, token=2, finish_reason="length")
        finally:
            self.closed.append(route[0])


def generator_for(client: HeldClient, *instances: Instance) -> PipelineGenerator:
    state = State(instances={each.instance_id: each for each in instances})
    return PipelineGenerator(cast(PipelineClient, client), FakeNodeServices().tokenizer, lambda: state)


def open_stream(generator: PipelineGenerator, requested: Instance) -> AsyncGenerator[GeneratedToken, None]:
    stream = generator.generate(requested, [1, 2], SamplingParams(), 2)
    return cast("AsyncGenerator[GeneratedToken, None]", stream)


async def first_token(
    generator: PipelineGenerator, requested: Instance
) -> AsyncGenerator[GeneratedToken, None]:
    stream = open_stream(generator, requested)
    await anext(stream)
    return stream


async def test_concurrent_generations_spread_over_the_ready_instances_of_a_model() -> None:
    client = HeldClient()
    one, two = instance("i-1"), instance("i-2")
    generator = generator_for(client, one, two, instance("i-3", status="loading"), instance("o-1", "other"))
    streams = [await first_token(generator, one) for _ in range(4)]
    assert sorted(client.routes) == ["tcp://i-1", "tcp://i-1", "tcp://i-2", "tcp://i-2"]
    assert generator.in_flight == {"i-1": 2, "i-2": 2}
    client.release.set()
    for stream in streams:
        async for _ in stream:
            pass
    assert generator.in_flight == {}
    # Idle again: a request keeps the instance it was given (a chat stays with its prefix cache).
    client.routes.clear()
    async for _ in generator.generate(two, [1], SamplingParams(), 2):
        pass
    assert client.routes == ["tcp://i-2"]


async def test_closing_a_stream_early_closes_the_clients_generation_at_once() -> None:
    client = HeldClient()
    generator = generator_for(client, instance("i-1"))
    async with contextlib.aclosing(open_stream(generator, instance("i-1"))) as tokens:
        await anext(tokens)
    assert client.closed == ["tcp://i-1"]  # not left to the garbage collector
    assert generator.in_flight == {}


class DeadRouteClient:
    """Fails every generation on a route in `dead` as a stage would (code "unreachable"), and
    answers one token on any other route."""

    def __init__(self, dead: set[str]) -> None:
        self.dead = dead
        self.routes: list[str] = []
        self.tried = asyncio.Event()

    async def generate(
        self, route: list[str], request: GenerationRequest
    ) -> AsyncGenerator[TokenSampled, None]:
        self.routes.append(route[0])
        self.tried.set()
        if route[0] in self.dead:
            raise GenerationError("r", f"stage {route[0]} is unreachable", UNREACHABLE)
        yield TokenSampled(request_id="r", step=0, token=1, finish_reason="length")


class MovingState:
    """A state that tests replace, with the replica's wait_for over it."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.changed = asyncio.Condition()

    async def replace(self, state: State) -> None:
        async with self.changed:
            self.state = state
            self.changed.notify_all()

    async def wait_for(self, predicate: object, timeout: float) -> bool:
        assert callable(predicate)
        try:
            async with asyncio.timeout(timeout), self.changed:
                await self.changed.wait_for(lambda: bool(predicate(self.state)))
        except TimeoutError:
            return False
        return True


def moving_generator(client: DeadRouteClient, moving: MovingState) -> PipelineGenerator:
    return PipelineGenerator(
        cast(PipelineClient, client),
        FakeNodeServices().tokenizer,
        lambda: moving.state,
        wait_for_state=moving.wait_for,
    )


def restarted(old: Instance, address: str) -> Instance:
    runner = RunnerInfo(status="ready", activation_address=address)
    return msgspec.structs.replace(old, runners={"node0": runner})


async def test_a_dead_route_is_tried_again_once_its_runner_has_a_new_address() -> None:
    """After a restart the log names the previous process's runners until the new ones report:
    a request that found a stage gone before any token waits for the new route, then answers."""
    stale = instance("i-1")
    moving = MovingState(State(instances={"i-1": stale}))
    client = DeadRouteClient({"tcp://i-1"})
    stream = open_stream(moving_generator(client, moving), stale)
    answer = asyncio.ensure_future(anext(stream))
    await client.tried.wait()  # the first try went to the stale address
    assert not answer.done()
    await moving.replace(State(instances={"i-1": restarted(stale, "tcp://new")}))
    token = await asyncio.wait_for(answer, 5)
    assert token.token_id == 1
    assert client.routes == ["tcp://i-1", "tcp://new"]


async def test_a_dead_route_of_a_failed_instance_ends_with_the_stages_error() -> None:
    stale = instance("i-1")
    moving = MovingState(State(instances={"i-1": stale}))
    client = DeadRouteClient({"tcp://i-1"})
    answer = asyncio.ensure_future(anext(open_stream(moving_generator(client, moving), stale)))
    await client.tried.wait()
    await moving.replace(State(instances={"i-1": msgspec.structs.replace(stale, status="failed")}))
    with pytest.raises(GenerationAborted, match="unreachable"):
        await asyncio.wait_for(answer, 5)
    assert client.routes == ["tcp://i-1"]


async def test_a_dead_route_is_not_retried_without_a_state_to_wait_on() -> None:
    client = DeadRouteClient({"tcp://i-1"})
    with pytest.raises(GenerationAborted, match="unreachable"):
        await anext(open_stream(generator_for(cast(HeldClient, client), instance("i-1")), instance("i-1")))
