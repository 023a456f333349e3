"""Pipeline frames as a stage reads and writes them: decoding with validation, hidden states to and
from raw buffers, prompt chunking, and what a stage hands its shell to send."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from exo.core.decoding import DECODE_ERRORS
from exo.inference.protocol import (
    WIRE_DTYPES,
    ActivationsSent,
    BatchRow,
    GenerationStarted,
    PipelineMessage,
    encode,
    pipeline_decoder,
)
from exo.inference.shard import ShardSpec

Buffer = bytes | memoryview


class Outgoing(NamedTuple):
    """Frames to send to `address`. `request_id` says whose they are if sending fails (and
    `batch_request_ids` the other requests of a batched frame)."""

    address: str
    frames: tuple[Any, ...]
    request_id: str
    to_requester: bool = False
    batch_request_ids: tuple[str, ...] = ()


class MalformedFrameError(ValueError):
    pass


def decode_frames(frames: Sequence[Buffer]) -> tuple[PipelineMessage, Buffer | None]:
    """A received multipart message: [header] or, for ActivationsSent only, [header, buffer]."""
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


_WIRE_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def activations_problem(message: ActivationsSent, nbytes: int, hidden_size: int) -> str | None:
    """Why these activations cannot be run here, or None."""
    shape, rows = message.shape, 1 + len(message.batch)
    if message.dtype not in WIRE_DTYPES:
        return f"dtype {message.dtype!r}"
    if len(shape) != 3 or shape[0] != rows or shape[1] < 1 or shape[2] != hidden_size:
        return f"shape {shape} for {rows} rows of hidden size {hidden_size}"
    if math.prod(shape) * _WIRE_ITEM_BYTES[message.dtype] != nbytes:
        return f"{nbytes} bytes for shape {shape}"
    if message.batch:
        request_ids = [message.request_id, *(row.request_id for row in message.batch)]
        if shape[1] != 1 or not message.sample or len(set(request_ids)) != rows:
            return "a batch is single sampled tokens of distinct requests"
    return None


def start_problem(message: GenerationStarted, spec: ShardSpec, vocab_size: int, address: str) -> str | None:
    """Why this stage cannot take part in this generation, or None."""
    index, route = message.stage_index, message.route
    if index >= len(route):
        return f"stage_index {index} is past the route"
    if (index == 0) != spec.is_first or (index == len(route) - 1) != spec.is_last:
        return (
            f"route mismatch: stage {index} of {len(route)} at {address} holds layers "
            f"[{spec.start_layer}, {spec.end_layer}) of {spec.n_layers}"
        )
    if spec.is_first and any(not 0 <= token < vocab_size for token in message.prompt_tokens):
        return f"prompt token ids must be in [0, {vocab_size})"
    if index == 0 and (message.prefix_entry is not None or message.cached_tokens or message.store_prefix):
        return "prefix_entry, cached_tokens and store_prefix are the first stage's to set"
    if (message.prefix_entry is None) != (message.cached_tokens == 0) or (
        message.cached_tokens >= len(message.prompt_tokens)
    ):
        return f"cached_tokens {message.cached_tokens} does not fit prefix_entry and the prompt"
    return None


def activation_frames(rows: Sequence[tuple[str, str, int]], hidden: mx.array, sample: bool) -> list[Outgoing]:
    """Frames for the next stages: `rows` are (next address, request id, step) of `hidden`'s rows;
    one frame per address, batched when several rows go there."""
    mx.eval(hidden)
    by_address: dict[str, list[int]] = {}
    for position, (address, _, _) in enumerate(rows):
        by_address.setdefault(address, []).append(position)
    outgoing: list[Outgoing] = []
    for address, positions in by_address.items():
        selected = hidden if len(positions) == len(rows) else hidden[mx.array(positions)]
        dtype, buffer = hidden_to_wire(selected)
        (_, request_id, step), *others = [rows[position] for position in positions]
        header = ActivationsSent(
            request_id=request_id, step=step, shape=list(selected.shape), dtype=dtype, sample=sample,
            batch=[BatchRow(other_id, other_step) for _, other_id, other_step in others],
        )  # fmt: skip
        batch_ids = tuple(other_id for _, other_id, _ in others)
        outgoing.append(Outgoing(address, (encode(header), buffer), request_id, False, batch_ids))
    return outgoing


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


def prefill_chunks(prompt_length: int, step_size: int, start: int = 0) -> list[tuple[int, int]]:
    """[start, end) spans as mlx-lm prefills: chunks of step_size up to the last token, then it
    alone. With `start` (a cached prefix), the prompt from there on."""
    spans: list[tuple[int, int]] = []
    while prompt_length - start > 1:
        end = start + min(step_size, prompt_length - start - 1)
        spans.append((start, end))
        start = end
    spans.append((start, prompt_length))
    return spans
