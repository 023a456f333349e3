"""OpenAI's request and response bodies for chat completions and model listing, as msgspec Structs.

Requests do not forbid unknown fields: OpenAI SDKs send many optional fields (`user`, `logprobs`,
`presence_penalty`...) that exo ignores, and refusing them would break those clients. The fields
exo reads are typed and bounded, so a wrong type or value is a 400 that names the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from exo.api.services import FinishReason

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextContentPart(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    text: str


class ImageContentPart(msgspec.Struct, frozen=True, tag="image_url", tag_field="type"):
    # Parsed only to refuse it with a clear message: exo serves text models.
    image_url: dict[str, object] | str


ContentPart = TextContentPart | ImageContentPart


class ChatMessage(msgspec.Struct, frozen=True):
    role: Role
    # None is allowed for an assistant turn that only carried tool calls.
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


NonEmptyString = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
StopString = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class ChatCompletionRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: NonEmptyString
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    seed: int | None = None
    stop: StopString | Annotated[list[StopString], msgspec.Meta(max_length=16)] | None = None
    # Only one choice per request; accepted so clients that send n=1 explicitly work.
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct, frozen=True):
    role: Literal["assistant"]
    content: str


class Choice(msgspec.Struct, frozen=True):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(msgspec.Struct, frozen=True):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, frozen=True):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    # Only on the usage chunk (stream_options.include_usage), after the finish chunk.
    usage: Usage | None = None


class ModelObject(msgspec.Struct, frozen=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    n_layers: int
    bytes: int
    architecture: str
    supported: bool
    reason: str


class ModelList(msgspec.Struct, frozen=True):
    object: Literal["list"]
    data: list[ModelObject]
