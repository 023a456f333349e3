"""Messages between the worker and its runners, and between pipeline stages.

Two channels, each a closed msgspec union encoded as msgpack (never pickle):

- control: the worker binds a ROUTER; each runner connects a DEALER whose routing id is its runner
  id, says `RunnerStarted`, and gets `LoadShard` / `Shutdown`.
- pipeline: every runner binds one PULL (its activation address). Frames are multipart:
  `[header]`, or `[header, buffer]` for `ActivationsSent`, whose buffer is the hidden state's raw
  bytes (C order, `dtype`, `shape`). The frame count must match the header's kind.

A frame that does not decode into its channel's union is dropped and counted by the receiver.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

# --- control: worker <-> runner -------------------------------------------------------------


class _Message(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    pass


class LoadShard(_Message, frozen=True):
    """Load layers [start_layer, end_layer) of the model at `model_path` (a folder in HF layout)."""

    instance_id: str
    model_id: str
    model_path: str
    start_layer: Annotated[int, msgspec.Meta(ge=0)]
    end_layer: Annotated[int, msgspec.Meta(ge=1)]
    n_layers: Annotated[int, msgspec.Meta(ge=1)]


class Shutdown(_Message, frozen=True):
    pass


class RunnerStarted(_Message, frozen=True):
    """First message of a runner: the worker learns its routing id and pid."""

    runner_id: str
    pid: int


class ShardLoaded(_Message, frozen=True):
    instance_id: str
    activation_address: str  # tcp://HOST:PORT of the runner's PULL socket
    start_layer: int
    end_layer: int
    weight_bytes: int
    load_seconds: float
    blas: str


class RunnerFailed(_Message, frozen=True):
    """The runner cannot do its job (missing model, unsupported architecture, out of memory...)."""

    reason: str
    instance_id: str | None = None


class RunnerStats(_Message, frozen=True):
    """Sent every few seconds once a shard is loaded; local figures for `/node_status`."""

    instance_id: str
    steps_done: int
    tokens_sampled: int
    active_requests: int
    queued_work: int
    dropped_frames: int
    stale_frames: int
    resident_bytes: int
    peak_resident_bytes: int


ControlToRunner = LoadShard | Shutdown
ControlFromRunner = RunnerStarted | ShardLoaded | RunnerFailed | RunnerStats


# --- pipeline: requester <-> stages -----------------------------------------------------------


MAX_TOP_LOGPROBS: Final = 20


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: no top-k cut
    seed: int | None = None  # same seed, prompt and params: same tokens
    # Everything below defaults to "off", so frames from before these fields decode unchanged.
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0  # drop tokens below min_p x the top one
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] = 0.0  # per token seen in the output
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] = 0.0  # per occurrence in the output
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] = 1.0  # prompt + output, as mlx-lm
    logit_bias: dict[int, Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]] = {}
    logprobs: bool = False  # send the sampled token's log-probability
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] = 0  # and this many alternatives


class GenerationStarted(_Message, frozen=True):
    """Sent by the requester to route[0]; each stage forwards it (stage_index + 1) to the next."""

    request_id: str
    route: Annotated[list[str], msgspec.Meta(min_length=1)]  # activation addresses, stage order
    reply_to: str  # the requester's TokenSink address
    prompt_tokens: Annotated[list[int], msgspec.Meta(min_length=1)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    eos_token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    stage_index: Annotated[int, msgspec.Meta(ge=0)] = 0


class ActivationsSent(_Message, frozen=True):
    """Hidden state for the next stage; the raw buffer is the frame after this header.

    `step` is the index of the token this pass produces. A prompt is sent as one or more chunks
    (as mlx-lm prefills); only the chunk with `sample` set produces a token.
    """

    request_id: str
    step: Annotated[int, msgspec.Meta(ge=0)]
    shape: list[int]
    dtype: str
    sample: bool = True


class TokenSampled(_Message, frozen=True):
    """From the last stage to reply_to and to route[0] (the next step's input).

    With finish_reason "stop" the token is the EOS token, not content. A finished TokenSampled
    also travels the route from route[0] so every stage frees the request's cache.
    """

    request_id: str
    step: int
    token: int
    finish_reason: Literal["stop", "length"] | None = None
    # With SamplingParams.logprobs: the model's log-probability of `token` (before penalties, bias,
    # temperature and truncation) and the `top_logprobs` most likely (token, log-probability) pairs.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class GenerationCancelled(_Message, frozen=True):
    """From the requester to route[0]; each stage frees the request and forwards it."""

    request_id: str


class GenerationFailed(_Message, frozen=True):
    request_id: str
    reason: str
    stage_address: str = ""


class StageAlive(_Message, frozen=True):
    """Heartbeat from a stage to a requester: it still holds these requests."""

    stage_address: str
    request_ids: list[str]


PipelineMessage = (
    GenerationStarted | ActivationsSent | TokenSampled | GenerationCancelled | GenerationFailed | StageAlive
)
FINISH_REASONS: Final = ("stop", "length")

# Hidden-state dtypes a stage accepts on the wire (names as numpy and mlx both spell them).
WIRE_DTYPES: Final = frozenset({"float32", "float16", "bfloat16"})

control_to_runner_decoder: Final = msgspec.msgpack.Decoder(ControlToRunner)
control_from_runner_decoder: Final = msgspec.msgpack.Decoder(ControlFromRunner)
pipeline_decoder: Final = msgspec.msgpack.Decoder(PipelineMessage)
encoder: Final = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return encoder.encode(message)
