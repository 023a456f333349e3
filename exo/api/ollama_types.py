"""Ollama's request and response bodies (the `/api/*` routes, served under `/ollama/api/*`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from exo.api.openai_types import (
    MAX_STOP_STRINGS,
    MinP,
    NonEmptyString,
    Penalty,
    RepetitionPenalty,
    StopString,
    ToolDefinition,
    TopK,
    TopP,
)


class ToolCallFunction(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    arguments: dict[str, Any]
    index: int | None = None


class ToolCall(msgspec.Struct, frozen=True):
    function: ToolCallFunction


class Message(msgspec.Struct, frozen=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class Options(msgspec.Struct, frozen=True):
    """The options exo honours; Ollama's others (num_ctx, num_thread, mirostat...) are accepted."""

    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    seed: int | None = None
    num_predict: int | None = None  # -1 (unbounded) and -2 (fill the context): up to the context
    stop: Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None = None
    repeat_penalty: RepetitionPenalty = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None


Format = str | dict[str, Any] | None
KeepAlive = str | float | None


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: NonEmptyString
    messages: list[Message] = []
    tools: list[ToolDefinition] | None = None
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: NonEmptyString
    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    stream: bool = True
    format: Format = None
    options: Options | None = None
    images: list[str] | None = None
    keep_alive: KeepAlive = None
    think: bool | str | None = None


class ShowRequest(msgspec.Struct, frozen=True):
    model: NonEmptyString
    verbose: bool = False


class AnswerMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["assistant"]
    content: str
    tool_calls: list[ToolCall] | None = None
    thinking: str | None = None


class ChatChunk(msgspec.Struct, frozen=True, omit_defaults=True):
    model: str
    created_at: str
    message: AnswerMessage
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateChunk(msgspec.Struct, frozen=True, omit_defaults=True):
    model: str
    created_at: str
    response: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    thinking: str | None = None  # the model's separated thinking


class ModelDetails(msgspec.Struct, frozen=True):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ListedModel(msgspec.Struct, frozen=True):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class ModelTags(msgspec.Struct, frozen=True):
    models: list[ListedModel]


class RunningModel(msgspec.Struct, frozen=True):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int


class RunningModels(msgspec.Struct, frozen=True):
    models: list[RunningModel]


class ShowResponse(msgspec.Struct, frozen=True):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class Version(msgspec.Struct, frozen=True):
    version: str
