"""PipelineGenerator: several ready instances of one model share the load; closing a stream
closes the pipeline client's generation at once (that is what cancels it on the stages)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import cast

from exo.api.cluster_port import GeneratedToken
from exo.core.events import ShardAssignment
from exo.core.sampling import SamplingParams
from exo.core.state import Instance, RunnerInfo, State
from exo.inference.client import GenerationRequest, PipelineClient
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
