"""OpenAI's chat completion and model bodies, as msgspec Structs.

Requests do not forbid unknown fields: OpenAI SDKs send optional fields exo has no use for
(`user`, `metadata`, `store`...), and refusing them would break those clients. Every field exo
reads is typed and bounded, so a wrong type or value is a 400 that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from exo.core.sampling import MAX_TOP_LOGPROBS

Role = Literal["system", "developer", "user", "assistant", "tool"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]
MAX_CHOICES = 16
MAX_STOP_STRINGS = 16


class TextContentPart(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    text: str


class ImageContentPart(msgspec.Struct, frozen=True, tag="image_url", tag_field="type"):
    # Parsed only to refuse it with a clear message: exo serves text models.
    image_url: dict[str, Any] | str


ContentPart = TextContentPart | ImageContentPart


class FunctionCall(msgspec.Struct, frozen=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(msgspec.Struct, frozen=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct, frozen=True):
    role: Role
    # None is allowed for an assistant turn that only carried tool calls.
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class FunctionDefinition(msgspec.Struct, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(msgspec.Struct, frozen=True):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(msgspec.Struct, frozen=True):
    name: str


class NamedToolChoice(msgspec.Struct, frozen=True):
    function: NamedFunction
    type: Literal["function"] = "function"


class ResponseFormat(msgspec.Struct, frozen=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


NonEmptyString = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
StopString = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Stop = StopString | Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)] | None
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)] | None
TopK = Annotated[int, msgspec.Meta(ge=0)] | None
MinP = Annotated[float, msgspec.Meta(ge=0, le=1)] | None
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)] | None
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0, le=10)] | None
LogitBias = dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None
PositiveInt = Annotated[int, msgspec.Meta(ge=1)] | None
Choices = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)]


class ChatCompletionRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: NonEmptyString
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt = None
    max_completion_tokens: PositiveInt = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    seed: int | None = None
    stop: Stop = None
    n: Choices = 1
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    repetition_penalty: RepetitionPenalty = None
    logit_bias: LogitBias = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # How much the model thinks, for templates that take it ("none" turns thinking off).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    user: str | None = None


class PromptTokensDetails(msgspec.Struct, frozen=True):
    cached_tokens: int  # prompt tokens whose prefill the prefix cache skipped


class Usage(msgspec.Struct, frozen=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # when the runners report a cache hit


class TopLogprob(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct, frozen=True):
    content: list[TokenLogprob]


class ToolCallFunction(msgspec.Struct, frozen=True):
    name: str
    arguments: str


class ToolCall(msgspec.Struct, frozen=True):
    id: str
    function: ToolCallFunction
    type: Literal["function"] = "function"


class AssistantMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None  # the model's thinking (vLLM's, DeepSeek's and LiteLLM's field)


class Choice(msgspec.Struct, frozen=True):
    index: int
    message: AssistantMessage
    finish_reason: ChatFinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct, frozen=True):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ToolCallDeltaFunction(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    index: int
    function: ToolCallDeltaFunction
    id: str | None = None
    type: Literal["function"] | None = None


class Delta(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None


class ChunkChoice(msgspec.Struct, frozen=True):
    index: int
    delta: Delta
    finish_reason: ChatFinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    # Only on the usage chunk (stream_options.include_usage), after the finish chunks.
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
    context_length: int | None = None


class ModelList(msgspec.Struct, frozen=True):
    object: Literal["list"]
    data: list[ModelObject]


class CancelledCompletion(msgspec.Struct, frozen=True):
    id: str
    cancelled: bool = True
