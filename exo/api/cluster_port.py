"""The API's port onto the cluster: one Protocol (`NodeServices`), its value types, its typed errors.

The API holds no cluster logic. Every controller is a few lines over a `NodeServices`, which the
node implements over its state, its bus and its runners (and tests implement with fakes). The
errors below are the only exceptions a `NodeServices` method may raise on purpose; the API maps
each to an HTTP status and an OpenAI-style error object (see exo/api/errors.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Collection, Sequence
from typing import Any, Literal, Protocol, cast, runtime_checkable

import msgspec

from exo.core.events import IndexedEvent, Sharding
from exo.core.models import ModelInfo
from exo.core.placement import PlacementPreview
from exo.core.sampling import SamplingParams
from exo.core.state import Instance, State
from exo.core.timings import StageTimings

FinishReason = Literal["stop", "length"]


class GeneratedToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One token out of the last pipeline stage.

    `finish_reason` is set on the last token only: "stop" when the model produced an end-of-sequence
    token (that token is yielded, with its id, and is not rendered), "length" when this is the
    `max_tokens`-th token.
    """

    token_id: int
    finish_reason: FinishReason | None = None
    # With SamplingParams.logprobs: the model's log-probability of this token and the
    # `top_logprobs` most likely (token id, log-probability) pairs, most likely first.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # Prompt tokens whose prefill the prefix cache skipped (usage.prompt_tokens_details.cached_tokens).
    cached_tokens: int | None = None
    # On the first token only: the generation's id in the pipeline, under which the node keeps
    # its stages' timings (NodeTimings.stage_timings), for the completion's trace.
    generation_id: str | None = None


class TokenStream(Protocol):
    """An async iterator of generated tokens that can be closed early (an async generator is one)."""

    def __aiter__(self) -> AsyncIterator[GeneratedToken]: ...

    def __anext__(self) -> Awaitable[GeneratedToken]: ...

    def aclose(self) -> Awaitable[None]:
        """Stop the generation on every stage; no more tokens follow."""
        ...


class StreamingDetokenizer(Protocol):
    """Turns token ids into text as they arrive (mlx_lm's StreamingDetokenizer has this shape)."""

    def add_token(self, token: int) -> None: ...

    def finalize(self) -> None:
        """Flush text held back for more tokens (a partial UTF-8 character, an unfinished word)."""
        ...

    @property
    def last_segment(self) -> str:
        """The text added since this was last read."""
        ...


class ChatTokenizer(Protocol):
    """A model's tokenizer as the API uses it (mlx_lm's TokenizerWrapper has this shape)."""

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        *,
        tokenize: bool,
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
        **template_options: Any,
    ) -> list[int]:
        """The prompt's token ids for a conversation of `{"role", "content", ...}` messages
        (assistant `tool_calls`, tool `tool_call_id` as Hugging Face templates take them), with
        `tools` (OpenAI function definitions) rendered where the template renders them.

        `template_options` are variables for the template (`enable_thinking`, `reasoning_effort`);
        a template that does not use one ignores it.

        Raises whatever the chat template raises on a conversation it refuses; the API reports
        that as a 400.
        """
        ...

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh detokenizer for one completion (not shared between requests)."""
        ...

    @property
    def eos_token_ids(self) -> Collection[int]: ...


class TextTokenizer(Protocol):
    """The rest of a tokenizer the API uses: plain text in and out, and the template's source."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of plain text (legacy completions, forced prefixes)."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """The text of some token ids (the alternatives in `top_logprobs`)."""
        ...

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        """The Jinja template (Ollama's `/api/show` returns it; it tells the tool-call format)."""
        ...


def text_tokenizer(tokenizer: ChatTokenizer) -> TextTokenizer:
    """The same tokenizer, seen through TextTokenizer.

    mlx-lm's TokenizerWrapper forwards `encode`, `decode` and `chat_template` to the Hugging Face
    tokenizer through `__getattr__`, which type checkers cannot follow, so ChatTokenizer does not
    declare them; every tokenizer the node hands the API has them.
    """
    return cast(TextTokenizer, tokenizer)


class NodeServices(Protocol):
    """This node as the HTTP API sees it. Read methods are sync and cheap (no I/O); the rest are async."""

    @property
    def node_id(self) -> str: ...

    def state(self) -> State:
        """The state as this node last applied it (the state document is derived from this)."""
        ...

    async def events_since(self, index: int, limit: int) -> list[IndexedEvent]:
        """Indexed events with `index > index`, ascending, at most `limit` (>= 1) of them.

        An index past the end gives an empty list. Reads this node's event store.
        """
        ...

    def node_status(self) -> dict[str, object]:
        """This node's local runtime figures (not in the log): JSON-encodable values only.

        Suggested keys: `node_id`, `uptime_s`, `is_master`, `peers`, `blas`, `dropped_frames` (by
        socket), `queue_depths` (by queue), `runners` (by instance id).
        """
        ...

    def models(self) -> list[ModelInfo]:
        """The models in this node's models dir, sorted by model id, unsupported ones included
        (`supported`/`reason` say why; `GET /v1/models` lists only supported ones)."""
        ...

    async def place_instance(self, model_id: str, sharding: Sharding, min_nodes: int) -> Instance:
        """Place a new instance of `model_id` on at least `min_nodes` alive nodes.

        Returns the instance once this node has applied its `InstanceCreated` (so a following
        `GET /instance/{id}` finds it); it is usually still `placing`/`loading` then.
        Raises ModelNotFound, NoCapacity (with the placement refusal's reasons), ClusterUnavailable
        (no master to sequence the command).
        """
        ...

    async def previews(self, model_id: str) -> list[PlacementPreview]:
        """Placements of `model_id` over 1..n alive nodes, feasible or with the reasons why not.

        A Hub model no node holds is sized from the Hub's metadata (nothing is fetched), as
        `place_instance` sizes it. Raises ModelNotFound, ModelUnavailable (the Hub refused or is
        unreachable).
        """
        ...

    async def delete_instance(self, instance_id: str) -> None:
        """Delete an instance; returns once this node has applied its `InstanceDeleted`.

        Raises InstanceNotFound, ClusterUnavailable.
        """
        ...

    async def remove_node(self, node_id: str) -> None:
        """Remove a member that is gone for good (`exo cluster remove`); returns once this node has
        applied its `NodeRemoved`. Needs no quorum: it is how a cluster that lost one for good
        gets it back. Raises NodeNotFound, NodeStillAnswers, ClusterUnavailable.
        """
        ...

    async def ensure_instance(self, model_id: str, timeout_s: float) -> Instance:
        """A `ready` instance of `model_id`: an existing ready one, else the one loading, else a new one
        placed as `place_instance(model_id, "Pipeline", 1)` would.

        Waits until the instance is ready, at most `timeout_s` seconds.
        Raises ModelNotFound, NoCapacity, InstanceFailed (the instance it waited on failed),
        InstanceNotReady (the deadline passed), ClusterUnavailable.
        """
        ...

    def generate(
        self,
        instance: Instance,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
    ) -> TokenStream:
        """Run one completion through the instance's pipeline, yielding tokens as the last stage makes them.

        At most `max_tokens` tokens; the last one carries the finish reason, then the iterator ends.
        Closing the iterator early (`aclose()`, which the API does on a stop string or a client that
        went away) cancels the generation on every stage.
        Raises GenerationAborted (before or between tokens) promptly, within seconds, when a stage
        fails or goes away; never hangs on a dead stage.
        """
        ...

    async def tokenizer(self, model_id: str) -> ChatTokenizer:
        """The tokenizer of `model_id` (loaded once and cached by the node). Raises ModelNotFound."""
        ...


@runtime_checkable
class NodeTimings(Protocol):
    """Services that also keep what each pipeline stage reported of a generation (the node's do)."""

    async def stage_timings(self, generation_id: str, wait: float) -> list[StageTimings]:
        """The stages' timings of a generation (GeneratedToken.generation_id), in stage order,
        waiting up to `wait` seconds for stages that have not reported yet; empty when unknown."""
        ...


class ServiceError(Exception):
    """Base of the errors a NodeServices method raises on purpose. `str(error)` is shown to clients."""


class ModelNotFound(ServiceError):
    """`hint` says how to get it (a Hub model that is not local: how to fetch it)."""

    def __init__(self, model_id: str, hint: str = "") -> None:
        super().__init__(f"model {model_id!r} not found" + (f": {hint}" if hint else ""))
        self.model_id = model_id


class ModelUnavailable(ServiceError):
    """A model could not be fetched or deleted: the Hub refused (gated: 403, no such repo: 404,
    unreachable: 503), the disk is full (507), or its files are in use (409)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class InstanceNotFound(ServiceError):
    def __init__(self, instance_id: str) -> None:
        super().__init__(f"instance {instance_id!r} not found")
        self.instance_id = instance_id


class NoCapacity(ServiceError):
    """No placement fits: `reasons` are the placement refusal's lines (each node's shortfall...)."""

    def __init__(self, model_id: str, reasons: Sequence[str]) -> None:
        detail = "; ".join(reasons) if reasons else "no alive nodes"
        super().__init__(f"not enough capacity to place {model_id!r}: {detail}")
        self.model_id = model_id
        self.reasons = list(reasons)


class InstanceFailed(ServiceError):
    def __init__(self, instance_id: str, reason: str) -> None:
        super().__init__(f"instance {instance_id!r} failed: {reason}")
        self.instance_id = instance_id
        self.reason = reason


class InstanceNotReady(ServiceError):
    """The instance did not become ready before the deadline."""

    def __init__(self, instance_id: str, timeout_s: float) -> None:
        super().__init__(f"instance {instance_id!r} not ready after {timeout_s:g} s")
        self.instance_id = instance_id
        self.timeout_s = timeout_s


class GenerationAborted(ServiceError):
    """A stage failed or went away during a generation."""

    def __init__(self, instance_id: str, reason: str) -> None:
        super().__init__(f"generation on instance {instance_id!r} failed: {reason}")
        self.instance_id = instance_id
        self.reason = reason


class Overloaded(ServiceError):
    """The instance is serving as many requests as it may and its queue is full: answer 503 with
    a Retry-After of `retry_after_s` seconds."""

    def __init__(self, instance_id: str, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"instance {instance_id!r} is overloaded: {reason}")
        self.instance_id = instance_id
        self.reason = reason
        self.retry_after_s = retry_after_s


class NodeNotFound(ServiceError):
    def __init__(self, node_id: str) -> None:
        super().__init__(f"node {node_id!r} is not a member of the cluster")
        self.node_id = node_id


class NodeStillAnswers(ServiceError):
    """A member that still answers is not removed (it would go on acting as one)."""

    def __init__(self, node_id: str) -> None:
        super().__init__(f"node {node_id!r} still answers; stop it before removing it")
        self.node_id = node_id


class ClusterUnavailable(ServiceError):
    """The command could not reach a master (an election in progress, a partition), or this node
    sees no majority of the cluster's members: answered 503 with a Retry-After of `retry_after_s`."""

    def __init__(self, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"cluster unavailable: {reason}")
        self.reason = reason
        self.retry_after_s = retry_after_s
