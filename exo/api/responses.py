"""A Responses request -> the chat completions request exo already serves.

The Responses API is a different surface over the same generation: input items become chat
messages, flat function tools become chat's nested ones, `text.format` becomes `response_format`,
`max_output_tokens` becomes `max_tokens`. Going through `ChatCompletionRequest` and `chat_request`
keeps one set of checks and one rendering path, so what the chat route learns (constrained
decoding, tool_choice enforcement) reaches Responses without a change here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import msgspec

from exo.api.errors import ApiError
from exo.api.openai_types import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    MessageToolCall,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    ToolDefinition,
)
from exo.api.responses_store import StoredResponse
from exo.api.responses_types import (
    INCLUDE_LOGPROBS,
    ITEM_TYPES,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputFile,
    InputImage,
    InputItem,
    InputPart,
    InputText,
    MessageItem,
    NamedFunctionChoice,
    OutputTextIn,
    ReasoningItem,
    RefusalIn,
    ResponsesRequest,
    TextConfig,
    TextFormatJsonObject,
    TextFormatJsonSchema,
    TextFormatText,
    ToolChoiceMode,
)

# The chat request's fields, as a Responses client knows them (for errors raised on the chat path).
CHAT_TO_RESPONSES_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
}


class Translated(msgspec.Struct, frozen=True, kw_only=True):
    chat: ChatCompletionRequest
    conversation: list[ChatMessage]  # earlier turns and this input, without the instructions
    input_items: list[dict[str, Any]]  # this input as items with ids (GET .../input_items)
    tools: list[FunctionTool]
    tool_choice: ToolChoiceMode | NamedFunctionChoice
    text: TextConfig


@contextmanager
def responses_params() -> Iterator[None]:
    """Errors raised on the shared chat path name the Responses field, not the chat one."""
    try:
        yield
    except ApiError as error:
        if error.param is not None:
            # messages[3] is not input[3]: instructions and earlier turns come first.
            head = error.param.partition(".")[0].partition("[")[0]
            error.param = CHAT_TO_RESPONSES_PARAMS.get(head, error.param)
        raise


def translate(body: ResponsesRequest, previous: StoredResponse | None) -> Translated:
    items = input_items(body.input)
    if not items:
        raise ApiError(400, "input must not be empty", "input", "invalid_request")
    earlier = list(previous.conversation) if previous is not None else []
    new_messages = conversation(items, earlier)
    if not earlier and not new_messages:
        raise ApiError(
            400, "input has no message to answer (only reasoning items)", "input", "invalid_request"
        )
    instructions = [ChatMessage("system", body.instructions)] if body.instructions else []
    tools = function_tools(body.tools)
    tool_choice = responses_tool_choice(body.tool_choice)
    text = body.text or TextConfig()
    logprobs = INCLUDE_LOGPROBS in (body.include or [])
    chat = ChatCompletionRequest(
        model=body.model,
        messages=[*instructions, *earlier, *new_messages],
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=[_chat_tool(tool) for tool in tools] or None,
        tool_choice=_chat_tool_choice(tool_choice),
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=response_format(text),
        logprobs=logprobs or None,
        top_logprobs=body.top_logprobs if logprobs else None,
        user=body.user,
    )
    return Translated(
        chat=chat,
        conversation=[*earlier, *new_messages],
        input_items=[_listed(item) for item in items],
        tools=tools,
        tool_choice=tool_choice,
        text=text,
    )


def input_items(value: str | list[dict[str, Any]]) -> list[InputItem]:
    if isinstance(value, str):
        return [MessageItem(role="user", content=value)] if value else []
    items: list[InputItem] = []
    for index, raw in enumerate(value):
        # OpenAI's "easy" message form has no type: a role makes it a message.
        kind = raw.get("type", "message" if "role" in raw else None)
        item_type = ITEM_TYPES.get(kind) if isinstance(kind, str) else None
        if item_type is None:
            known = ", ".join(sorted(ITEM_TYPES))
            raise ApiError(
                400,
                f"input[{index}] has type {kind!r}, which exo does not take (it takes {known})",
                f"input[{index}].type",
                "unsupported_input_item",
            )
        items.append(_convert(raw, item_type, f"input[{index}]"))
    return items


def conversation(items: list[InputItem], earlier: list[ChatMessage]) -> list[ChatMessage]:
    """Input items as chat messages: consecutive function calls join one assistant turn."""
    messages: list[ChatMessage] = []
    call_ids = {call.id for message in earlier for call in message.tool_calls or []}
    for index, item in enumerate(items):
        match item:
            case MessageItem():
                messages.append(ChatMessage(item.role, _text(item.content, f"input[{index}].content")))
            case FunctionCallItem():
                call = MessageToolCall(item.call_id, FunctionCall(item.name, item.arguments))
                call_ids.add(item.call_id)
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant" and last.tool_call_id is None:
                    calls = [*(last.tool_calls or []), call]
                    messages[-1] = msgspec.structs.replace(last, tool_calls=calls)
                else:
                    messages.append(ChatMessage("assistant", None, tool_calls=[call]))
            case FunctionCallOutputItem():
                if item.call_id not in call_ids:
                    raise ApiError(
                        400,
                        f"no function call found with call_id {item.call_id!r} for this function_call_output "
                        "(send the function_call item before it, or chain with previous_response_id)",
                        f"input[{index}].call_id",
                        "invalid_request",
                    )
                output = _text(item.output, f"input[{index}].output")
                messages.append(ChatMessage("tool", output, tool_call_id=item.call_id))
            case ReasoningItem():
                pass  # a reasoning model's earlier thinking: chat templates drop it too
    return messages


def function_tools(tools: list[dict[str, Any]] | None) -> list[FunctionTool]:
    converted: list[FunctionTool] = []
    for index, raw in enumerate(tools or []):
        kind = raw.get("type")
        if kind != "function":
            raise ApiError(
                400,
                f"tools[{index}] has type {kind!r}: exo serves function tools only (no built-in tools)",
                f"tools[{index}].type",
                "unsupported_tool",
            )
        converted.append(_convert(raw, FunctionTool, f"tools[{index}]"))
    return converted


def responses_tool_choice(
    choice: ToolChoiceMode | dict[str, Any] | None,
) -> ToolChoiceMode | NamedFunctionChoice:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    if choice.get("type") != "function":
        raise ApiError(
            400,
            f"tool_choice of type {choice.get('type')!r} is not supported: use 'none', 'auto', 'required' "
            "or {'type': 'function', 'name': ...}",
            "tool_choice",
            "unsupported_tool_choice",
        )
    return _convert(choice, NamedFunctionChoice, "tool_choice")


def response_format(text: TextConfig) -> ResponseFormat | None:
    match text.format:
        case TextFormatText():
            return None
        case TextFormatJsonObject():
            return ResponseFormat("json_object")
        case TextFormatJsonSchema():
            schema = msgspec.to_builtins(text.format)
            schema.pop("type", None)
            return ResponseFormat("json_schema", schema)


def assistant_turn(text: str, calls: list[MessageToolCall]) -> ChatMessage | None:
    """An answer as the chat message the next chained request renders."""
    if not text and not calls:
        return None
    return ChatMessage("assistant", text or None, tool_calls=calls or None)


# --- internals --------------------------------------------------------------------------------


ItemT = TypeVar("ItemT")


def _convert(raw: dict[str, Any], item_type: type[ItemT], where: str) -> ItemT:
    try:
        return msgspec.convert(raw, type=item_type)
    except msgspec.ValidationError as error:
        message, _, location = str(error).partition(" - at `$")
        path = location.rstrip("`")
        missing = message.partition("required field `")[2].rstrip("`")
        param = where + path + (f".{missing}" if missing else "")
        raise ApiError(400, f"invalid value for '{param}': {message}", param, "invalid_request") from error


def _text(content: str | list[InputPart], where: str) -> str:
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for index, part in enumerate(content):
        match part:
            case InputImage() | InputFile():
                raise ApiError(
                    400,
                    "image and file input are not supported: exo serves text models",
                    f"{where}[{index}]",
                    "unsupported_content",
                )
            case RefusalIn():
                texts.append(part.refusal)
            case InputText() | OutputTextIn():
                texts.append(part.text)
    return "".join(texts)


def _listed(item: InputItem) -> dict[str, Any]:
    listed = msgspec.to_builtins(item)
    if isinstance(item, MessageItem) and isinstance(item.content, str):
        listed["content"] = [{"type": "input_text", "text": item.content}]
    listed["id"] = item.id or f"{_ID_PREFIXES[type(item)]}_{uuid.uuid4().hex}"
    listed.setdefault("status", "completed")
    return listed


_ID_PREFIXES: dict[type[InputItem], str] = {
    MessageItem: "msg",
    FunctionCallItem: "fc",
    FunctionCallOutputItem: "fco",
    ReasoningItem: "rs",
}


def _chat_tool(tool: FunctionTool) -> ToolDefinition:
    return ToolDefinition(FunctionDefinition(tool.name, tool.description, tool.parameters, tool.strict))


def _chat_tool_choice(choice: ToolChoiceMode | NamedFunctionChoice) -> Any:
    if isinstance(choice, NamedFunctionChoice):
        return NamedToolChoice(NamedFunction(choice.name))
    return choice
