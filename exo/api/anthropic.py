"""Claude's Messages API (`POST /v1/messages`) as a thin translation onto CompletionRequest.

The system prompt is a top-level field; content is a string or a list of blocks (`text`,
`tool_use` in assistant turns, `tool_result` in user turns); tools have an `input_schema`.
Streaming sends named events: message_start, content_block_start / _delta / _stop per block,
message_delta (stop reason, output tokens), message_stop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Annotated, Any, Literal, cast

import msgspec

from exo.api.cluster_port import ServiceError
from exo.api.completion import ChatPrompt, CompletionRequest, ToolSpec
from exo.api.constraints import OutputFormat
from exo.api.decoding import ChoiceEnded, ReasoningDelta, TextDelta, ToolCallMade
from exo.api.errors import ApiError, anthropic_error, service_error_body
from exo.api.openai_chat import sampling_params
from exo.api.openai_types import MAX_STOP_STRINGS, NonEmptyString, StopString, TopK, TopP
from exo.api.runs import CompletionRun, collect, server_sent_event

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextBlock(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    text: str
    cache_control: dict[str, Any] | None = None


class ImageBlock(msgspec.Struct, frozen=True, tag="image", tag_field="type"):
    source: dict[str, Any]  # parsed only to refuse it clearly


class ToolUseBlock(msgspec.Struct, frozen=True, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, frozen=True, tag="tool_result", tag_field="type"):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(msgspec.Struct, frozen=True, tag="thinking", tag_field="type"):
    thinking: str  # earlier reasoning a client sends back; not rendered
    signature: str | None = None


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock


class Message(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(msgspec.Struct, frozen=True):
    name: NonEmptyString
    input_schema: dict[str, Any]
    description: str | None = None


class ToolChoice(msgspec.Struct, frozen=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(msgspec.Struct, frozen=True):
    """Extended thinking: "enabled" / "adaptive" turn the template's thinking on, "disabled" off.
    `budget_tokens` is accepted; the output's `max_tokens` is the only bound exo enforces."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None


class OutputConfig(msgspec.Struct, frozen=True):
    format: dict[str, Any] | None = None  # structured output: {"type": "json_schema", "schema": ...}
    effort: str | None = None


class MessagesRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: NonEmptyString
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: TopP = None
    top_k: TopK = None
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    thinking: ThinkingConfig | None = None


class OutputText(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    text: str


class OutputThinking(msgspec.Struct, frozen=True, tag="thinking", tag_field="type"):
    thinking: str
    signature: str = ""  # exo does not sign thinking; clients send it back unchanged


class OutputToolUse(msgspec.Struct, frozen=True, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(msgspec.Struct, frozen=True, omit_defaults=True):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | None = None  # prompt tokens the prefix cache served


class MessageResponse(msgspec.Struct, frozen=True):
    id: str
    model: str
    content: list[OutputThinking | OutputText | OutputToolUse]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: MessageUsage
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"


# --- request ---------------------------------------------------------------------------------


def messages_request(body: MessagesRequest) -> CompletionRequest:
    return CompletionRequest(
        model=body.model,
        prompt=ChatPrompt(conversation(body), tool_spec(body), thinking_options(body.thinking)),
        sampling=sampling_params(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
        max_tokens=body.max_tokens,
        stop=list(body.stop_sequences or []),
        output=output_format(body.output_config),
    )


def thinking_options(thinking: ThinkingConfig | None) -> dict[str, Any]:
    if thinking is None:
        return {}
    return {"enable_thinking": thinking.type != "disabled"}


def output_format(config: OutputConfig | None) -> OutputFormat | None:
    """Claude's structured output, `{"type": "json_schema", "schema": {...}}`: always strict."""
    if config is None or config.format is None:
        return None
    fmt = config.format
    schema = fmt.get("schema")
    if fmt.get("type") != "json_schema" or not isinstance(schema, dict):
        raise ApiError(
            400,
            'output_config.format must be {"type": "json_schema", "schema": {...}}',
            "output_config.format",
            "invalid_request",
        )
    return OutputFormat(
        schema=cast("dict[str, Any]", schema), strict=True, param="output_config.format.schema"
    )


def conversation(body: MessagesRequest) -> list[dict[str, Any]]:
    rendered: list[dict[str, Any]] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "".join(block.text for block in body.system)
        rendered.append({"role": "system", "content": system})
    for message_index, message in enumerate(body.messages):
        if isinstance(message.content, str):
            rendered.append({"role": message.role, "content": message.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block_index, block in enumerate(message.content):
            param = f"messages[{message_index}].content[{block_index}]"
            match block:
                case TextBlock():
                    texts.append(block.text)
                case ToolUseBlock():
                    calls.append(
                        {
                            "id": block.id,
                            "type": "function",
                            "function": {"name": block.name, "arguments": block.input},
                        }
                    )
                case ToolResultBlock():
                    rendered.append(
                        {
                            "role": "tool",
                            "tool_call_id": block.tool_use_id,
                            "content": _result_text(block, param),
                        }
                    )
                case ImageBlock():
                    raise ApiError(
                        400,
                        "image content is not supported: exo serves text models",
                        param,
                        "unsupported_content",
                    )
                case ThinkingBlock():
                    pass
        if texts or calls or message.role == "assistant":
            entry: dict[str, Any] = {"role": message.role, "content": "".join(texts)}
            if calls:
                entry["tool_calls"] = calls
            rendered.append(entry)
    return rendered


def _result_text(block: ToolResultBlock, param: str) -> str:
    if block.content is None or isinstance(block.content, str):
        return block.content or ""
    if any(isinstance(part, ImageBlock) for part in block.content):
        raise ApiError(
            400, "image content is not supported: exo serves text models", param, "unsupported_content"
        )
    return "".join(part.text for part in block.content if isinstance(part, TextBlock))


def tool_spec(body: MessagesRequest) -> ToolSpec | None:
    choice = body.tool_choice or ToolChoice("auto")
    tools = body.tools or []
    if choice.type in ("any", "tool") and not tools:
        raise ApiError(400, f"tool_choice {choice.type!r} needs tools", "tool_choice", "invalid_request")
    if choice.type == "none" or not tools:
        return None
    definitions = [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description or "",
                "parameters": tool.input_schema,
            },
        }
        for tool in tools
    ]
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if choice.name not in [tool.name for tool in tools]:
            raise ApiError(
                400,
                f"tool_choice names {choice.name!r}, which is not in tools",
                "tool_choice.name",
                "invalid_request",
            )
        chosen = [tool for tool in definitions if tool["function"]["name"] == choice.name]
        return ToolSpec(definitions=chosen, mode="named", name=choice.name, parallel=False)
    return ToolSpec(
        definitions=definitions, mode="required" if choice.type == "any" else "auto", parallel=parallel
    )


# --- answers ---------------------------------------------------------------------------------


def stop_reason(ended: ChoiceEnded) -> StopReason:
    if ended.reason == "tool_calls":
        return "tool_use"
    if ended.reason == "length":
        return "max_tokens"
    return "stop_sequence" if ended.stop_sequence is not None else "end_turn"


def _input(arguments: str) -> dict[str, Any]:
    value = json.loads(arguments)  # the decoder made it: always a JSON object
    assert isinstance(value, dict)
    return value  # pyright: ignore[reportUnknownVariableType]


async def message_response(
    run: CompletionRun, model: str, receive: Callable[[], Any] | None
) -> MessageResponse:
    (result,) = await collect(run, receive)
    content: list[OutputThinking | OutputText | OutputToolUse] = []
    if result.reasoning_text is not None:
        content.append(OutputThinking(result.reasoning_text))
    if result.text or not result.tool_calls:
        content.append(OutputText(result.text))
    content += [OutputToolUse(call.id, call.name, _input(call.arguments)) for call in result.tool_calls]
    usage = MessageUsage(run.prompt_tokens, run.completion_tokens, run.cached_tokens)
    return MessageResponse(
        run.completion_id, model, content, stop_reason(result.ended), result.ended.stop_sequence, usage
    )


async def message_stream(run: CompletionRun, model: str) -> AsyncGenerator[bytes, None]:
    def event(name: str, payload: dict[str, Any]) -> bytes:
        return server_sent_event({"type": name, **payload}, event=name)

    usage = MessageUsage(run.prompt_tokens, 0)
    start = MessageResponse(run.completion_id, model, [], None, None, usage)
    yield event("message_start", {"message": start})
    block = -1
    open_kind: Literal["text", "thinking"] | None = None  # the block being streamed
    try:
        async with aclosing(run.events()) as events:
            async for _, item in events:
                match item:
                    case TextDelta(text=text) if text:
                        if open_kind != "text":
                            if open_kind is not None:
                                yield event("content_block_stop", {"index": block})
                            block, open_kind = block + 1, "text"
                            yield event(
                                "content_block_start", {"index": block, "content_block": OutputText("")}
                            )
                        yield event(
                            "content_block_delta",
                            {"index": block, "delta": {"type": "text_delta", "text": text}},
                        )
                    case ReasoningDelta(text=text):
                        if open_kind != "thinking":
                            if open_kind is not None:
                                yield event("content_block_stop", {"index": block})
                            block, open_kind = block + 1, "thinking"
                            start = {"index": block, "content_block": OutputThinking("")}
                            yield event("content_block_start", start)
                        delta = {"type": "thinking_delta", "thinking": text}
                        yield event("content_block_delta", {"index": block, "delta": delta})
                    case ToolCallMade():
                        if open_kind is not None:
                            yield event("content_block_stop", {"index": block})
                            open_kind = None
                        block += 1
                        tool_use = OutputToolUse(item.id, item.name, {})
                        yield event("content_block_start", {"index": block, "content_block": tool_use})
                        delta = {"type": "input_json_delta", "partial_json": item.arguments}
                        yield event("content_block_delta", {"index": block, "delta": delta})
                        yield event("content_block_stop", {"index": block})
                    case ChoiceEnded():
                        if block < 0:  # nothing was generated: still one (empty) text block
                            block, open_kind = 0, "text"
                            yield event(
                                "content_block_start", {"index": block, "content_block": OutputText("")}
                            )
                        if open_kind is not None:
                            yield event("content_block_stop", {"index": block})
                        delta = {"stop_reason": stop_reason(item), "stop_sequence": item.stop_sequence}
                        yield event(
                            "message_delta",
                            {"delta": delta, "usage": {"output_tokens": run.completion_tokens}},
                        )
                    case _:
                        pass
    except ServiceError as error:
        status_code, body = service_error_body(error)
        yield server_sent_event(anthropic_error(status_code, body.error.message), event="error")
        return
    yield event("message_stop", {})
