"""Messages between the worker and its runners, and between pipeline stages.

Two channels, each a closed msgspec union encoded as msgpack (never pickle):

- control: the worker binds a ROUTER; each runner connects a DEALER whose routing id is its runner
  id, says `RunnerStarted`, and gets `LoadShard` / `Shutdown`.
- tensor steps: rank 0 of a tensor instance pushes every step (`StepShared`) to the other ranks'
  activation PULL, which take nothing else (exo.inference.tensor).
- pipeline: every runner binds one PULL (its activation address). Frames are multipart:
  `[header]`, or `[header, buffer]` for `ActivationsSent`, whose buffer is the hidden state's raw
  bytes (C order, `dtype`, `shape`). The frame count must match the header's kind.

A frame that does not decode into its channel's union is dropped and counted by the receiver.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from exo.core.events import RunnerFailure
from exo.core.sampling import SamplingParams
from exo.core.timings import StageTimings

# --- control: worker <-> runner -------------------------------------------------------------


class _RunnerMessage(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    pass


class LoadShard(_RunnerMessage, frozen=True):
    """Load layers [start_layer, end_layer) of the model at `model_path` (a folder in HF layout)."""

    instance_id: str
    model_id: str
    model_path: str
    start_layer: Annotated[int, msgspec.Meta(ge=0)]
    end_layer: Annotated[int, msgspec.Meta(ge=1)]
    n_layers: Annotated[int, msgspec.Meta(ge=1)]
    # What placement chose for `--weights-dtype auto` (None: no choice, the runner decides).
    placed_weights: Literal["float32", "native"] | None = None
    # A tensor instance's rank of `size` (a pipeline stage: 0 of 1). With size > 1 the runner
    # answers `RingListening` and waits for `RingFormed` before it loads.
    rank: Annotated[int, msgspec.Meta(ge=0)] = 0
    size: Annotated[int, msgspec.Meta(ge=1)] = 1


class RingFormed(_RunnerMessage, frozen=True):
    """Every rank of the runner's tensor instance is listening: `hosts[r]` is rank r's ring address
    (HOST:PORT, mx.distributed's ring hostfile), `activation_addresses[r]` its PULL socket."""

    hosts: Annotated[list[str], msgspec.Meta(min_length=2)]
    activation_addresses: Annotated[list[str], msgspec.Meta(min_length=2)]


class RingListening(_RunnerMessage, frozen=True):
    """A tensor rank's runner reserved its ring port and bound its PULL socket; the worker puts
    both in the log (authenticated bus) so every rank's worker can hand its runner the ring."""

    instance_id: str
    ring_address: str  # HOST:PORT
    activation_address: str


class StepShared(_RunnerMessage, frozen=True):
    """Rank 0's step `turn` for the other ranks: the pipeline frames it took since the last turn
    (in order; a request whose requester vanished comes as a GenerationCancelled), then whether it
    ran a forward pass. The other ranks apply the same and so launch the same collectives."""

    turn: Annotated[int, msgspec.Meta(ge=0)]
    run: bool
    messages: list[bytes] = []


class Shutdown(_RunnerMessage, frozen=True):
    pass


class RunnerStarted(_RunnerMessage, frozen=True):
    """First message of a runner: the worker learns its routing id and pid."""

    runner_id: str
    pid: int


class ShardLoaded(_RunnerMessage, frozen=True):
    instance_id: str
    activation_address: str  # tcp://HOST:PORT of the runner's PULL socket
    start_layer: int
    end_layer: int
    weight_bytes: int
    load_seconds: float
    blas: str
    weights: Literal["float32", "native"] = "native"  # the representation the stage holds


class RunnerFailed(_RunnerMessage, frozen=True):
    """The runner cannot do its job (missing model, unsupported architecture, out of memory...)."""

    reason: str
    instance_id: str | None = None
    failure: RunnerFailure | None = None  # the kind, where a rule acts on it (exo.core.events)


class RunnerStats(_RunnerMessage, frozen=True):
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
    # Batching, admission and prefix cache figures (defaults: frames from older runners decode).
    waiting_requests: int = 0  # admitted later, when active ones end (first stage only)
    refused_requests: int = 0  # refused as busy: the waiting queue was full
    batched_steps: int = 0  # forward passes that ran several requests' steps at once
    batched_rows: int = 0  # request steps run in those passes
    largest_batch: int = 0
    prefix_cache_entries: int = 0  # usable: on the first stage, those every stage confirmed
    prefix_cache_tokens: int = 0
    prefix_cache_bytes: int = 0
    prefix_cache_hits: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose prefill a hit skipped, summed
    grouped_prompt_chunks: int = 0  # prompt chunks prefilled in one pass with other requests' chunks


ControlToRunner = LoadShard | RingFormed | Shutdown
ControlFromRunner = RunnerStarted | RingListening | ShardLoaded | RunnerFailed | RunnerStats


# --- pipeline: requester <-> stages -----------------------------------------------------------


class GenerationStarted(_RunnerMessage, frozen=True):
    """Sent by the requester to route[0]; each stage forwards it (stage_index + 1) to the next."""

    request_id: str
    route: Annotated[list[str], msgspec.Meta(min_length=1)]  # activation addresses, stage order
    reply_to: str  # the requester's TokenSink address
    prompt_tokens: Annotated[list[int], msgspec.Meta(min_length=1)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    eos_token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    stage_index: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Set by the first stage when it forwards the start (a requester leaves them unset): the first
    # `cached_tokens` prompt positions come from prefix cache entry `prefix_entry`, which every
    # stage of the route holds; `store_prefix` says a PrefixCached will follow the request's end.
    prefix_entry: str | None = None
    cached_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    store_prefix: bool = False


class BatchRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    request_id: str
    step: Annotated[int, msgspec.Meta(ge=0)]


class ActivationsSent(_RunnerMessage, frozen=True):
    """Hidden state for the next stage; the raw buffer is the frame after this header.

    `step` is the index of the token this pass produces. A prompt is sent as one or more chunks
    (as mlx-lm prefills); only the chunk with `sample` set produces a token.
    """

    request_id: str
    step: Annotated[int, msgspec.Meta(ge=0)]
    shape: list[int]
    dtype: str
    sample: bool = True
    # A batch of single-token steps of several requests: buffer row 0 is (request_id, step), row
    # i + 1 is batch[i]; shape is (1 + len(batch), 1, hidden). Empty: one request's rows.
    batch: list[BatchRow] = []


class TokenSampled(_RunnerMessage, frozen=True):
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
    # Prompt tokens whose prefill the prefix cache skipped (on every token; None from old stages).
    cached_tokens: int | None = None


class GenerationCancelled(_RunnerMessage, frozen=True):
    """From the requester to route[0]; each stage frees the request and forwards it."""

    request_id: str


FailureCode = Literal["busy", "unreachable"]


class GenerationFailed(_RunnerMessage, frozen=True):
    request_id: str
    reason: str
    stage_address: str = ""
    # "busy": the instance refused the request because its queue is full; try again after
    # `retry_after` seconds. "unreachable": a stage of the route is gone (or its runner stopped)
    # before the request could go on. None: any other failure.
    code: FailureCode | None = None
    retry_after: Annotated[float, msgspec.Meta(ge=0.0)] | None = None


class PrefixCached(_RunnerMessage, frozen=True):
    """A finished request's KV cache kept as a prefix cache entry (named by its request id).

    The first stage decides and sends it along the route, ahead of the finished TokenSampled:
    each stage drops the entries in `evicted`, keeps the request's first `tokens` cache positions
    (0: keeps nothing) and passes it on; the last stage answers PrefixCacheConfirmed to route[0].
    """

    request_id: str
    route: Annotated[list[str], msgspec.Meta(min_length=2)]  # the finished request's route
    stage_index: Annotated[int, msgspec.Meta(ge=1)]  # of the stage it is sent to
    tokens: Annotated[int, msgspec.Meta(ge=0)]
    evicted: list[str] = []


class PrefixCacheConfirmed(_RunnerMessage, frozen=True):
    """From the last stage to route[0]: every stage holds entry `request_id`, so it may be used."""

    request_id: str
    stage_address: str = ""


class StageAlive(_RunnerMessage, frozen=True):
    """Heartbeat from a stage to a requester: it still holds these requests."""

    stage_address: str
    request_ids: list[str]


class StageTimed(_RunnerMessage, frozen=True):
    """From each stage to the requester when a request ends there (finished or cancelled): where
    its time went on that stage, for the request's trace. One per stage per request."""

    request_id: str
    timings: StageTimings


PipelineMessage = (
    GenerationStarted
    | ActivationsSent
    | TokenSampled
    | GenerationCancelled
    | GenerationFailed
    | StageAlive
    | PrefixCached
    | PrefixCacheConfirmed
    | StageTimed
)
FINISH_REASONS: Final = ("stop", "length")

# Hidden-state dtypes a stage accepts on the wire (names as numpy and mlx both spell them).
WIRE_DTYPES: Final = frozenset({"float32", "float16", "bfloat16"})

control_to_runner_decoder: Final = msgspec.msgpack.Decoder(ControlToRunner)
control_from_runner_decoder: Final = msgspec.msgpack.Decoder(ControlFromRunner)
pipeline_decoder: Final = msgspec.msgpack.Decoder(PipelineMessage)
step_decoder: Final = msgspec.msgpack.Decoder(StepShared)
encoder: Final = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return encoder.encode(message)
