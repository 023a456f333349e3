"""OpenAI's Responses API bodies (`/v1/responses`), as msgspec Structs.

Input items and tools are decoded as plain objects and converted one by one (exo/api/responses.py):
OpenAI lets a message item omit its `type`, and a tool or item of a kind exo does not serve must be
refused with a message that names it, not with a generic tagged-union error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from exo.api.openai_types import (
    MAX_TOP_LOGPROBS,
    NonEmptyString,
    PositiveInt,
    Temperature,
    TokenLogprob,
    TopP,
)

ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "incomplete"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]
MAX_METADATA_PAIRS = 16
INCLUDE_LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for logprobs

# --- request ----------------------------------------------------------------------------------


class TextFormatText(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    pass


class TextFormatJsonObject(msgspec.Struct, frozen=True, tag="json_object", tag_field="type"):
    pass


class TextFormatJsonSchema(
    msgspec.Struct, frozen=True, tag="json_schema", tag_field="type", omit_defaults=True
):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    schema: dict[str, Any]
    strict: bool | None = None
    description: str | None = None


TextFormat = TextFormatText | TextFormatJsonObject | TextFormatJsonSchema


class TextConfig(msgspec.Struct, frozen=True):
    format: TextFormat = TextFormatText()
    verbosity: Literal["low", "medium", "high"] | None = None


MetadataKey = Annotated[str, msgspec.Meta(max_length=64)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=MAX_METADATA_PAIRS)]
ToolChoiceMode = Literal["none", "auto", "required"]


class ResponsesRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: NonEmptyString
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    background: bool = False
    max_output_tokens: PositiveInt = None
    temperature: Temperature = None
    top_p: TopP = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoiceMode | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    metadata: Metadata | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None  # only INCLUDE_LOGPROBS has an effect
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


# Input items, converted from the request's objects one at a time.


class InputText(msgspec.Struct, frozen=True, tag="input_text", tag_field="type"):
    text: str


class OutputTextIn(msgspec.Struct, frozen=True, tag="output_text", tag_field="type"):
    text: str  # an earlier answer sent back; annotations and logprobs are ignored
    annotations: list[Any] = []


class RefusalIn(msgspec.Struct, frozen=True, tag="refusal", tag_field="type"):
    refusal: str


class InputImage(msgspec.Struct, frozen=True, tag="input_image", tag_field="type"):
    pass  # parsed only to refuse it clearly: exo serves text models


class InputFile(msgspec.Struct, frozen=True, tag="input_file", tag_field="type"):
    pass  # refused, as images are


InputPart = InputText | OutputTextIn | RefusalIn | InputImage | InputFile


class MessageItem(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]
    type: Literal["message"] = "message"
    id: str | None = None
    status: str | None = None


class FunctionCallItem(msgspec.Struct, frozen=True, kw_only=True):
    call_id: Annotated[str, msgspec.Meta(min_length=1)]
    name: Annotated[str, msgspec.Meta(min_length=1)]
    arguments: str
    type: Literal["function_call"] = "function_call"
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(msgspec.Struct, frozen=True, kw_only=True):
    call_id: Annotated[str, msgspec.Meta(min_length=1)]
    output: str | list[InputPart]
    type: Literal["function_call_output"] = "function_call_output"
    id: str | None = None
    status: str | None = None


class ReasoningItem(msgspec.Struct, frozen=True, kw_only=True):
    """Reasoning sent back by a client that chains by hand: accepted, not rendered."""

    type: Literal["reasoning"] = "reasoning"
    id: str | None = None
    summary: list[Any] = []


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
ITEM_TYPES: dict[str, type[InputItem]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}


class FunctionTool(msgspec.Struct, frozen=True, kw_only=True):
    """Responses' flat function tool (chat nests the same fields under `function`)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(msgspec.Struct, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    type: Literal["function"] = "function"


# --- answer -----------------------------------------------------------------------------------


class OutputText(msgspec.Struct, frozen=True, tag="output_text", tag_field="type"):
    text: str
    annotations: list[Any] = []
    logprobs: list[TokenLogprob] = []  # with include INCLUDE_LOGPROBS


class OutputMessage(msgspec.Struct, frozen=True, tag="message", tag_field="type"):
    id: str
    status: ItemStatus
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class OutputFunctionCall(msgspec.Struct, frozen=True, tag="function_call", tag_field="type"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class ReasoningText(msgspec.Struct, frozen=True, tag="reasoning_text", tag_field="type"):
    text: str


class OutputReasoning(msgspec.Struct, frozen=True, tag="reasoning", tag_field="type"):
    """The model's thinking (for models whose template has thinking markers), before its answer."""

    id: str
    status: ItemStatus
    content: list[ReasoningText]
    summary: list[Any] = []


OutputItem = OutputMessage | OutputFunctionCall | OutputReasoning


class InputTokensDetails(msgspec.Struct, frozen=True):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, frozen=True):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, frozen=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(msgspec.Struct, frozen=True):
    code: str
    message: str


class IncompleteDetails(msgspec.Struct, frozen=True):
    reason: Literal["max_output_tokens"]


class ResponseObject(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created_at: int
    status: ResponseStatus
    model: str
    output: list[OutputItem]
    instructions: str | None
    previous_response_id: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    tools: list[FunctionTool]
    tool_choice: ToolChoiceMode | NamedFunctionChoice
    parallel_tool_calls: bool
    text: TextConfig
    top_logprobs: int | None
    metadata: dict[str, str]
    store: bool
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    completed_at: int | None = None
    user: str | None = None
    object: Literal["response"] = "response"
    background: bool = False
    truncation: Literal["auto", "disabled"] = "disabled"
    reasoning: dict[str, Any] = {}


class DeletedResponse(msgspec.Struct, frozen=True):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class InputItemList(msgspec.Struct, frozen=True):
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


# --- stream events: `type` names the event (also the SSE `event:` line); `sequence_number` is
# set as each is sent ---------------------------------------------------------------------------


class ResponseLifecycle(msgspec.Struct, frozen=True):
    """response.created / in_progress / completed / incomplete / failed: the whole response."""

    type: str
    response: ResponseObject
    sequence_number: int = 0


class OutputItemEvent(msgspec.Struct, frozen=True):
    """response.output_item.added / .done."""

    type: str
    output_index: int
    item: OutputItem
    sequence_number: int = 0


class ContentPartEvent(msgspec.Struct, frozen=True):
    """response.content_part.added / .done."""

    type: str
    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int = 0


class TextDeltaEvent(msgspec.Struct, frozen=True):
    type: str
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[TokenLogprob] = []
    sequence_number: int = 0


class TextDoneEvent(msgspec.Struct, frozen=True):
    type: str
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[TokenLogprob] = []
    sequence_number: int = 0


class ArgumentsDeltaEvent(msgspec.Struct, frozen=True):
    type: str
    item_id: str
    output_index: int
    delta: str
    sequence_number: int = 0


class ArgumentsDoneEvent(msgspec.Struct, frozen=True):
    type: str
    item_id: str
    output_index: int
    name: str
    arguments: str
    sequence_number: int = 0


class ReasoningDeltaEvent(msgspec.Struct, frozen=True):
    """response.reasoning_text.delta."""

    type: str
    item_id: str
    output_index: int
    content_index: int
    delta: str
    sequence_number: int = 0


class ReasoningDoneEvent(msgspec.Struct, frozen=True):
    """response.reasoning_text.done."""

    type: str
    item_id: str
    output_index: int
    content_index: int
    text: str
    sequence_number: int = 0


StreamEvent = (
    ResponseLifecycle
    | ReasoningDeltaEvent
    | ReasoningDoneEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | ArgumentsDeltaEvent
    | ArgumentsDoneEvent
)
