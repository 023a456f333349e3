"""The pipeline stage engine: what a runner does with each frame, without any sockets.

`PipelineStage.handle_frames` takes one received multipart frame and returns the frames to send;
`run_next` runs one unit of work (a prefill chunk or a decode step of one request) and returns the
frames its result produces. The runner's shell owns the sockets and the loop; everything here is
testable by calling it.

Per request, every stage keeps its own KV cache. The first stage turns the prompt into chunks the
way mlx-lm's generate_step does (all but the last token in chunks of `prefill_step_size`, then the
last token alone), so the pipeline computes exactly what mlx-lm computes and greedy output matches
token for token. The last stage samples, sends `TokenSampled` to the requester and to the first
stage, which feeds the token back in as the next step's input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.core as mx
import msgspec
import numpy as np

from exo.bus.codec import DECODE_ERRORS
from exo.inference.protocol import (
    WIRE_DTYPES,
    ActivationsSent,
    GenerationCancelled,
    GenerationFailed,
    GenerationStarted,
    PipelineMessage,
    StageAlive,
    TokenSampled,
    encode,
    pipeline_decoder,
)
from exo.inference.sampling import TokenSampler
from exo.inference.scheduler import StageScheduler, Work
from exo.inference.shard import ShardModel

Buffer = bytes | memoryview


class Outgoing(NamedTuple):
    """Frames to send to `address`. `request_id` says whose they are if sending fails."""

    address: str
    frames: tuple[Any, ...]
    request_id: str
    to_requester: bool = False


@dataclass
class RequestState:
    request_id: str
    route: list[str]
    reply_to: str
    stage_index: int
    max_tokens: int
    eos_token_ids: frozenset[int]
    cache: list[Any]
    sampler: TokenSampler | None = None
    tokens_sampled: int = 0

    @property
    def next_address(self) -> str | None:
        following = self.stage_index + 1
        return self.route[following] if following < len(self.route) else None


@dataclass
class StageCounters:
    steps_done: int = 0
    requests_started: int = 0
    tokens_sampled: int = 0
    dropped_frames: int = 0  # malformed or impossible here
    stale_frames: int = 0  # for a request this stage does not hold (finished or cancelled)


def prefill_chunks(prompt_length: int, step_size: int) -> list[tuple[int, int]]:
    """[start, end) spans as mlx-lm prefills: chunks of step_size up to the last token, then it alone."""
    spans: list[tuple[int, int]] = []
    start = 0
    while prompt_length - start > 1:
        end = start + min(step_size, prompt_length - start - 1)
        spans.append((start, end))
        start = end
    spans.append((start, prompt_length))
    return spans


def hidden_to_wire(hidden: mx.array) -> tuple[str, np.ndarray]:
    """(dtype name, C-order buffer) without copying when the array is already contiguous."""
    dtype = str(hidden.dtype).removeprefix("mlx.core.")
    if dtype == "bfloat16":  # numpy has no bfloat16; ship the same bits as uint16
        return dtype, np.ascontiguousarray(np.asarray(hidden.view(mx.uint16)))
    return dtype, np.ascontiguousarray(np.asarray(hidden))


def hidden_from_wire(buffer: Buffer, shape: Sequence[int], dtype: str) -> mx.array:
    """The one copy on the receiving side: bytes -> an MLX array."""
    if dtype == "bfloat16":
        return mx.array(np.frombuffer(buffer, dtype=np.uint16).reshape(shape)).view(mx.bfloat16)
    return mx.array(np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape))


_WIRE_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class MalformedFrameError(ValueError):
    pass


class PipelineStage:
    def __init__(
        self,
        shard: ShardModel,
        address: str,
        *,
        prefill_step_size: int = 2048,
        max_active_requests: int = 64,
    ) -> None:
        self.shard = shard
        self.address = address
        self.prefill_step_size = prefill_step_size
        self.max_active_requests = max_active_requests
        self.requests: dict[str, RequestState] = {}
        self.scheduler = StageScheduler()
        self.counters = StageCounters()

    # --- receiving ----------------------------------------------------------------------

    def handle_frames(self, frames: Sequence[Buffer]) -> list[Outgoing]:
        """One received multipart message; malformed ones are counted and dropped."""
        try:
            message, buffer = self._decode(frames)
        except MalformedFrameError:
            self.counters.dropped_frames += 1
            return []
        return self.handle(message, buffer)

    def _decode(self, frames: Sequence[Buffer]) -> tuple[PipelineMessage, Buffer | None]:
        if not 1 <= len(frames) <= 2:
            raise MalformedFrameError(f"{len(frames)} frames")
        try:
            message = pipeline_decoder.decode(frames[0])
        except DECODE_ERRORS as error:
            raise MalformedFrameError(str(error)) from None
        has_buffer = len(frames) == 2
        if isinstance(message, ActivationsSent) != has_buffer:
            raise MalformedFrameError("only ActivationsSent carries a buffer, and it must")
        return message, frames[1] if has_buffer else None

    def handle(self, message: PipelineMessage, buffer: Buffer | None = None) -> list[Outgoing]:
        match message:
            case GenerationStarted():
                return self._start(message)
            case ActivationsSent():
                assert buffer is not None
                return self._activations(message, buffer)
            case TokenSampled():
                return self._token(message)
            case GenerationCancelled():
                return self._cancel(message)
            case GenerationFailed() | StageAlive():
                self.counters.dropped_frames += 1  # addressed to requesters, never to a stage
                return []

    def _fail(self, request_id: str, reply_to: str, reason: str) -> list[Outgoing]:
        failed = GenerationFailed(request_id=request_id, reason=reason, stage_address=self.address)
        return [Outgoing(reply_to, (encode(failed),), request_id, to_requester=True)]

    def _start(self, message: GenerationStarted) -> list[Outgoing]:
        spec = self.shard.spec
        request_id, index, route = message.request_id, message.stage_index, message.route
        if request_id in self.requests:
            self.counters.dropped_frames += 1  # a second start would corrupt the first's cache
            return []
        if index >= len(route):
            return self._fail(request_id, message.reply_to, f"stage_index {index} is past the route")
        if (index == 0) != spec.is_first or (index == len(route) - 1) != spec.is_last:
            return self._fail(
                request_id,
                message.reply_to,
                f"route mismatch: stage {index} of {len(route)} at {self.address} holds layers "
                f"[{spec.start_layer}, {spec.end_layer}) of {spec.n_layers}",
            )
        if len(self.requests) >= self.max_active_requests:
            return self._fail(request_id, message.reply_to, f"stage busy: {len(self.requests)} requests")
        vocab = self.shard.vocab_size
        if spec.is_first and any(not 0 <= token < vocab for token in message.prompt_tokens):
            return self._fail(request_id, message.reply_to, f"prompt token ids must be in [0, {vocab})")
        state = RequestState(
            request_id=request_id,
            route=list(route),
            reply_to=message.reply_to,
            stage_index=index,
            max_tokens=message.max_tokens,
            eos_token_ids=frozenset(message.eos_token_ids),
            cache=self.shard.make_cache(),
            sampler=TokenSampler(message.sampling, message.prompt_tokens) if spec.is_last else None,
        )
        self.requests[request_id] = state
        self.counters.requests_started += 1
        outgoing: list[Outgoing] = []
        if state.next_address is not None:
            forwarded = msgspec.structs.replace(message, stage_index=index + 1)
            outgoing.append(Outgoing(state.next_address, (encode(forwarded),), request_id))
        if spec.is_first:
            tokens = message.prompt_tokens
            spans = prefill_chunks(len(tokens), self.prefill_step_size)
            for position, (start, end) in enumerate(spans):
                chunk = mx.array(tokens[start:end])[None]
                self.scheduler.submit(Work(request_id, 0, chunk, sample=position == len(spans) - 1))
        return outgoing

    def _activations(self, message: ActivationsSent, buffer: Buffer) -> list[Outgoing]:
        if self.shard.spec.is_first:
            self.counters.dropped_frames += 1
            return []
        if message.request_id not in self.requests:
            self.counters.stale_frames += 1
            return []
        shape = message.shape
        if (
            message.dtype not in WIRE_DTYPES
            or len(shape) != 3
            or shape[0] != 1
            or shape[1] < 1
            or shape[2] != self.shard.hidden_size
            or math.prod(shape) * _WIRE_ITEM_BYTES[message.dtype] != memoryview(buffer).nbytes
        ):
            self.counters.dropped_frames += 1
            return []
        hidden = hidden_from_wire(buffer, shape, message.dtype)
        self.scheduler.submit(Work(message.request_id, message.step, hidden, sample=message.sample))
        return []

    def _token(self, message: TokenSampled) -> list[Outgoing]:
        state = self.requests.get(message.request_id)
        if state is None:
            self.counters.stale_frames += 1
            return []
        if message.finish_reason is not None:
            return self._release(state, message)
        if not self.shard.spec.is_first:
            self.counters.dropped_frames += 1
            return []
        self.scheduler.submit(
            Work(state.request_id, message.step + 1, mx.array([[message.token]]), sample=True)
        )
        return []

    def _cancel(self, message: GenerationCancelled) -> list[Outgoing]:
        state = self.requests.get(message.request_id)
        if state is None:
            self.counters.stale_frames += 1
            return []
        return self._release(state, message)

    def _release(self, state: RequestState, message: TokenSampled | GenerationCancelled) -> list[Outgoing]:
        """Free the request here and pass the news on; the last stage frees itself when it finishes."""
        self.drop_request(state.request_id)
        following = state.stage_index + 1
        if following < len(state.route) and not (
            isinstance(message, TokenSampled) and following == len(state.route) - 1
        ):
            return [Outgoing(state.route[following], (encode(message),), state.request_id)]
        return []

    def drop_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.scheduler.drop_request(request_id)

    def _abort(self, state: RequestState, reason: str) -> list[Outgoing]:
        """Free a request that cannot go on; tell its requester, and the stages after this one
        (the requester's cancel reaches those before it, and stops here)."""
        self.drop_request(state.request_id)
        outgoing = self._fail(state.request_id, state.reply_to, reason)
        if state.next_address is not None:
            cancelled = encode(GenerationCancelled(request_id=state.request_id))
            outgoing.append(Outgoing(state.next_address, (cancelled,), state.request_id))
        return outgoing

    def send_failed(self, item: Outgoing) -> list[Outgoing]:
        """The shell could not deliver `item`; decide what that means for its request."""
        state = self.requests.get(item.request_id)
        if state is None:
            return []
        if not item.to_requester:
            return self._abort(state, f"stage {item.address} is unreachable")
        # The requester is gone: free the request everywhere, starting from the first stage.
        self.drop_request(state.request_id)
        if state.stage_index == 0:
            return []
        cancelled = encode(GenerationCancelled(request_id=state.request_id))
        return [Outgoing(state.route[0], (cancelled,), state.request_id)]

    # --- computing ----------------------------------------------------------------------

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    def run_next(self) -> list[Outgoing]:
        work = self.scheduler.next()
        if work is None:
            return []
        state = self.requests.get(work.request_id)
        if state is None:
            return []
        try:
            output = self.shard.forward(work.inputs, state.cache)
            self.counters.steps_done += 1
            if not self.shard.spec.is_last:
                return self._send_activations(state, work, output)
            if not work.sample:
                mx.eval([layer_cache.state for layer_cache in state.cache])
                return []
            return self._sample(state, work, output)
        except (RuntimeError, ValueError, MemoryError) as error:
            # MLX reports allocation failures and shape errors this way; the request cannot go on.
            return self._abort(state, f"stage {self.address} failed: {error}")

    def _send_activations(self, state: RequestState, work: Work, hidden: mx.array) -> list[Outgoing]:
        mx.eval(hidden)
        dtype, buffer = hidden_to_wire(hidden)
        header = ActivationsSent(
            request_id=state.request_id,
            step=work.step,
            shape=list(hidden.shape),
            dtype=dtype,
            sample=work.sample,
        )
        assert state.next_address is not None
        return [Outgoing(state.next_address, (encode(header), buffer), state.request_id)]

    def _sample(self, state: RequestState, work: Work, logits: mx.array) -> list[Outgoing]:
        assert state.sampler is not None
        sampled_token = state.sampler(logits)
        token = sampled_token.token
        state.tokens_sampled += 1
        self.counters.tokens_sampled += 1
        finish_reason = None
        if token in state.eos_token_ids:
            finish_reason = "stop"
        elif work.step + 1 >= state.max_tokens:
            finish_reason = "length"
        sampled = TokenSampled(
            request_id=state.request_id,
            step=work.step,
            token=token,
            finish_reason=finish_reason,
            logprob=sampled_token.logprob,
            top_logprobs=sampled_token.top_logprobs,
        )
        frame = encode(sampled)
        outgoing = [Outgoing(state.reply_to, (frame,), state.request_id, to_requester=True)]
        first = self.shard.spec.is_first
        if finish_reason is not None:
            self.drop_request(state.request_id)
            if not first:
                outgoing.append(Outgoing(state.route[0], (frame,), state.request_id))
        elif first:
            self.scheduler.submit(Work(state.request_id, work.step + 1, mx.array([[token]]), sample=True))
        else:
            outgoing.append(Outgoing(state.route[0], (frame,), state.request_id))
        return outgoing

    # --- reporting ----------------------------------------------------------------------

    def requests_by_requester(self) -> dict[str, list[str]]:
        """reply_to address -> ids of the requests this stage holds for it (for StageAlive)."""
        by_requester: dict[str, list[str]] = {}
        for state in self.requests.values():
            by_requester.setdefault(state.reply_to, []).append(state.request_id)
        return by_requester
