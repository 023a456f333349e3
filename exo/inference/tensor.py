"""A tensor instance's ranks in step: the ring group, and rank 0 sharing each step.

Every rank holds 1/N of every layer (mlx-lm's `model.shard`); each forward pass all-reduces over
mx.distributed's ring backend (TCP), so every rank must run the same passes in the same order on
the same inputs. Rank 0 is the instance's only address in routes: it takes the requests, runs its
`PipelineStage` as a one-stage pipeline would, and before each pass pushes a `StepShared` to the
other ranks' PULL sockets: the frames it took since the last turn and whether it runs a pass.
The others apply exactly that to their own `PipelineStage`, so their schedulers, batches, prefix
caches and samplers take the same decisions, and throw their outputs away (rank 0 answers).
The step goes over ZeroMQ (CURVE with a cluster secret), not over a collective: it does not wait
for rank 0's MLX stream to drain, so rank 0 builds its next pass while the current one computes.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import tempfile
from collections.abc import Sequence
from typing import Any

import msgspec

from exo.core.decoding import DECODE_ERRORS
from exo.inference.protocol import (
    GenerationCancelled,
    GenerationStarted,
    StepShared,
    encode,
    pipeline_decoder,
    step_decoder,
)


def ring_address(host: str) -> str:
    """HOST:PORT for this rank's ring listener: a port free now on the instance's address only.
    MLX binds it itself in `join_ring` (it cannot take a bound socket), so the port is reserved by
    binding and closing it here; another process could take it in between, and then init fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    return f"{host}:{port}"


def join_ring(hosts: Sequence[str], rank: int) -> Any:
    """mx.distributed's ring group of this instance (blocks until every rank has connected).

    The hostfile is mx.distributed's own: a JSON list, one list of HOST:PORT per rank (what
    `mlx.launch --backend ring` writes); MLX_RANK says which is ours."""
    import mlx.core as mx

    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="exo-ring-", delete=False) as hostfile:
        json.dump([[host] for host in hosts], hostfile)
    os.environ["MLX_HOSTFILE"] = hostfile.name
    os.environ["MLX_RANK"] = str(rank)
    try:
        group = mx.distributed.init(strict=True, backend="ring")
    finally:
        os.unlink(hostfile.name)
    if group.size() != len(hosts) or group.rank() != rank:
        raise RuntimeError(
            f"ring formed as rank {group.rank()} of {group.size()}, wanted {rank} of {len(hosts)}"
        )
    return group


def with_seed(frame: bytes) -> bytes:
    """A GenerationStarted that samples at random without a seed gets one here, on rank 0, so every
    rank draws the same tokens (each rank's sampler would otherwise pick its own seed)."""
    try:
        message = pipeline_decoder.decode(frame)
    except DECODE_ERRORS:
        return frame
    if not isinstance(message, GenerationStarted) or message.sampling.seed is not None:
        return frame
    if message.sampling.temperature == 0:
        return frame
    sampling = msgspec.structs.replace(message.sampling, seed=secrets.randbits(63))
    return encode(msgspec.structs.replace(message, sampling=sampling))


class StepLeader:
    """Rank 0's side: collects what its stage took, and shares it before each pass."""

    def __init__(self, follower_addresses: Sequence[str]) -> None:
        self.follower_addresses = list(follower_addresses)
        self.pending: list[bytes] = []
        self.turn = 0
        self.shared_bytes = 0  # StepShared bytes pushed per follower, for the benchmarks

    def took(self, frame: bytes) -> None:
        self.pending.append(frame)

    def requesters_gone(self, request_ids: Sequence[str]) -> None:
        """Rank 0 freed these requests because their requester is unreachable: so do the others."""
        self.pending.extend(encode(GenerationCancelled(request_id=request_id)) for request_id in request_ids)

    def next_step(self, run: bool) -> bytes | None:
        """The StepShared to push now, or None when there is nothing to tell."""
        if not run and not self.pending:
            return None
        step = encode(StepShared(turn=self.turn, run=run, messages=self.pending))
        self.pending = []
        self.turn += 1
        self.shared_bytes += len(step)
        return step


class StepFollower:
    """A rank > 0's side: decodes rank 0's steps and checks none is missing."""

    def __init__(self) -> None:
        self.turn = 0

    def decode(self, frames: Sequence[bytes | memoryview]) -> StepShared | None:
        """The next step, or None for a frame that is not one (dropped: a tensor rank takes only
        rank 0's steps). Raises ValueError when a step is missing: the ranks are out of step."""
        if len(frames) != 1:
            return None
        try:
            step = step_decoder.decode(frames[0])
        except DECODE_ERRORS:
            return None
        if step.turn != self.turn:
            raise ValueError(f"rank 0's step {step.turn} arrived, step {self.turn} expected")
        self.turn += 1
        return step
