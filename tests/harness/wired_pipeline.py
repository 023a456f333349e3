"""Pipeline stages wired in one process without sockets, for the batching and prefix cache tests.

Frames go through the same encode/decode as on the wire. `run()` delivers every frame in flight
before any stage computes, then lets each stage with work run one pass, and repeats: requests
started together overlap, so their steps meet in batches deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exo.core.sampling import SamplingParams
from exo.inference.protocol import (
    GenerationFailed,
    GenerationStarted,
    PipelineMessage,
    StageTimed,
    TokenSampled,
    encode,
    pipeline_decoder,
)
from exo.inference.shard import ShardSpec, load_shard
from exo.inference.stage import Outgoing, PipelineStage
from tests.harness.inference_helpers import N_LAYERS, PREFILL_STEP_SIZE

REQUESTER = "tcp://requester"


class WiredPipeline:
    def __init__(self, model: Path, splits: Sequence[tuple[int, int]], **options: Any) -> None:
        self.route = [f"tcp://stage{index}" for index in range(len(splits))]
        options.setdefault("prefill_step_size", PREFILL_STEP_SIZE)
        self.stages = {
            address: PipelineStage(
                load_shard(model, ShardSpec(start_layer=start, end_layer=end, n_layers=N_LAYERS)),
                address,
                **options,
            )
            for address, (start, end) in zip(self.route, splits, strict=True)
        }
        self.in_flight: list[Outgoing] = []
        self.received: dict[str, list[PipelineMessage]] = {}

    @property
    def first(self) -> PipelineStage:
        return self.stages[self.route[0]]

    def start(
        self,
        request_id: str,
        prompt: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams | None = None,
        eos_token_ids: Sequence[int] = (),
        **fields: Any,
    ) -> None:
        message = GenerationStarted(
            request_id=request_id, route=self.route, reply_to=REQUESTER, prompt_tokens=list(prompt),
            max_tokens=max_tokens, eos_token_ids=list(eos_token_ids), sampling=sampling or SamplingParams(),
            **fields,
        )  # fmt: skip
        self.send(self.route[0], message)

    def send(self, address: str, message: Any, *frames: bytes) -> None:
        self.in_flight.append(Outgoing(address, (encode(message), *frames), ""))

    def deliver(self) -> None:
        while self.in_flight:
            items, self.in_flight = self.in_flight, []
            for item in items:
                frames = [bytes(memoryview(frame).cast("B")) for frame in item.frames]
                if item.address == REQUESTER:
                    message = pipeline_decoder.decode(frames[0])
                    assert isinstance(message, TokenSampled | GenerationFailed | StageTimed)
                    self.received.setdefault(message.request_id, []).append(message)
                else:
                    self.in_flight.extend(self.stages[item.address].handle_frames(frames))

    def step(self) -> bool:
        """Deliver what is in flight, then one pass on each stage with work; False when idle."""
        self.deliver()
        busy = [stage for stage in self.stages.values() if stage.has_work()]
        for stage in busy:
            self.in_flight.extend(stage.run_next())
        return bool(busy)

    def run(self, max_passes: int = 100_000) -> None:
        for _ in range(max_passes):
            if not self.step():
                return
        raise AssertionError("the pipeline did not settle")

    def tokens(self, request_id: str) -> list[int]:
        return [message.token for message in self.messages(request_id, TokenSampled)]

    def messages(self, request_id: str, kind: type[Any]) -> list[Any]:
        return [message for message in self.received.get(request_id, []) if isinstance(message, kind)]

    def idle(self) -> bool:
        return all(
            not stage.requests and not stage.has_work() and not stage.prefix.parked
            for stage in self.stages.values()
        )


def generate_alone(
    model: Path, splits: Sequence[tuple[int, int]], prompts: Sequence[Sequence[int]], max_tokens: int
) -> list[list[int]]:
    """Each prompt run by itself, one after the other, with no prefix cache."""
    pipeline = WiredPipeline(model, splits, prefix_cache_tokens=0)
    answers: list[list[int]] = []
    for position, prompt in enumerate(prompts):
        pipeline.start(f"alone-{position}", prompt, max_tokens)
        pipeline.run()
        answers.append(pipeline.tokens(f"alone-{position}"))
    return answers
