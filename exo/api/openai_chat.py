"""OpenAI chat completions: the request -> CompletionRequest, the run's events -> OpenAI bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Protocol, cast

from exo.api.cluster_port import ServiceError
from exo.api.completion import ChatPrompt, CompletionRequest, ToolSpec
from exo.api.constraints import OutputFormat
from exo.api.decoding import ChoiceEnded, ReasoningDelta, TextDelta, ToolCallMade
from exo.api.errors import ApiError, ErrorBody, service_error_body
from exo.api.openai_types import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ImageContentPart,
    LogitBias,
    NamedToolChoice,
    ResponseFormat,
    ToolCall,
    ToolCallDelta,
    ToolCallDeltaFunction,
    ToolCallFunction,
    ToolDefinition,
)
from exo.api.runs import CompletionRun, collect, server_sent_event
from exo.core.sampling import SamplingParams

DONE = b"data: [DONE]\n\n"


def chat_request(body: ChatCompletionRequest) -> CompletionRequest:
    """Checks OpenAI makes across fields, then the internal request."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(
            400, "stream_options is only allowed with stream: true", "stream_options", "invalid_request"
        )
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_request")
    max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.max_tokens, "max_tokens"
    return CompletionRequest(
        model=body.model,
        prompt=ChatPrompt(
            conversation(body.messages), tool_spec(body), reasoning_options(body.reasoning_effort)
        ),
        sampling=openai_sampling(body, logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0),
        max_tokens=max_tokens,
        max_tokens_param=param,
        stop=stop_strings(body.stop),
        n=body.n,
        output=output_format(body.response_format),
    )


def reasoning_options(effort: str | None) -> dict[str, Any]:
    """`reasoning_effort` as template variables: "none" turns thinking off (`enable_thinking`),
    the others turn it on and are passed as `reasoning_effort` for templates that take it."""
    if effort is None:
        return {}
    if effort == "none":
        return {"enable_thinking": False}
    return {"enable_thinking": True, "reasoning_effort": effort}


def output_format(response_format: ResponseFormat | None) -> OutputFormat | None:
    """OpenAI's `response_format`: "text" is free; "json_object" any JSON object; "json_schema"
    JSON matching `json_schema.schema`, enforced exactly with `json_schema.strict`."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return OutputFormat(schema=None, strict=True)
    spec = response_format.json_schema
    if spec is None:
        raise ApiError(
            400,
            "response_format json_schema needs a json_schema object",
            "response_format.json_schema",
            "invalid_request",
        )
    schema, strict = spec.get("schema"), spec.get("strict")
    if schema is not None and not isinstance(schema, dict):
        raise ApiError(
            400,
            "json_schema.schema must be an object",
            "response_format.json_schema.schema",
            "invalid_request",
        )
    if strict is not None and not isinstance(strict, bool):
        raise ApiError(
            400,
            "json_schema.strict must be a boolean",
            "response_format.json_schema.strict",
            "invalid_request",
        )
    return OutputFormat(
        schema=cast("dict[str, Any] | None", schema),
        strict=strict is True,
        param="response_format.json_schema.schema",
    )


class OpenAISamplingFields(Protocol):
    """The sampling fields chat and legacy completion bodies share."""

    @property
    def temperature(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def min_p(self) -> float | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def presence_penalty(self) -> float | None: ...
    @property
    def frequency_penalty(self) -> float | None: ...
    @property
    def repetition_penalty(self) -> float | None: ...
    @property
    def logit_bias(self) -> LogitBias: ...


def openai_sampling(body: OpenAISamplingFields, *, logprobs: bool, top_logprobs: int) -> SamplingParams:
    return sampling_params(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=body.logit_bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def sampling_params(
    *,
    temperature: float | None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    logit_bias: LogitBias = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    default_temperature: float = 1.0,
) -> SamplingParams:
    return SamplingParams(
        temperature=default_temperature if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,
        seed=seed,
        min_p=min_p or 0.0,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        logit_bias=token_bias(logit_bias),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def token_bias(logit_bias: LogitBias) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (logit_bias or {}).items():
        if not key.isdigit():
            raise ApiError(
                400, f"logit_bias keys must be token ids, got {key!r}", "logit_bias", "invalid_request"
            )
        bias[int(key)] = value
    return bias


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates take them."""
    rendered: list[dict[str, Any]] = []
    for message_index, message in enumerate(messages):
        # Templates know "system"; OpenAI's "developer" is the same turn for them.
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": message_text(message, message_index)}
        if message.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in message.tool_calls
            ]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            entry["name"] = message.name
        rendered.append(entry)
    return rendered


def message_text(message: ChatMessage, message_index: int) -> str:
    if message.content is None:
        # OpenAI requires content on every turn but the assistant's (which may carry only tool
        # calls, or be a placeholder some clients send as null).
        if message.role != "assistant":
            raise ApiError(
                400,
                f"messages[{message_index}]: a {message.role!r} message needs a 'content'",
                param=f"messages[{message_index}].content",
                code="invalid_request",
            )
        return ""
    if isinstance(message.content, str):
        return message.content
    texts: list[str] = []
    for part_index, part in enumerate(message.content):
        if isinstance(part, ImageContentPart):
            raise ApiError(
                400,
                "image content is not supported: exo serves text models",
                param=f"messages[{message_index}].content[{part_index}]",
                code="unsupported_content",
            )
        texts.append(part.text)
    return "".join(texts)


def _arguments(arguments: str) -> object:
    """Templates expect the arguments as an object (Hugging Face's convention); keep bad JSON as text."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def tool_spec(body: ChatCompletionRequest) -> ToolSpec | None:
    choice = body.tool_choice
    tools = body.tools or []
    if isinstance(choice, NamedToolChoice):
        names = [tool.function.name for tool in tools]
        if choice.function.name not in names:
            raise ApiError(
                400,
                f"tool_choice names {choice.function.name!r}, which is not in tools "
                f"({', '.join(names) or 'none given'})",
                "tool_choice",
                "invalid_request",
            )
        chosen = [tool for tool in tools if tool.function.name == choice.function.name]
        return ToolSpec(
            definitions=function_definitions(chosen),
            mode="named",
            name=choice.function.name,
            parallel=False,
            strict=strict_tools(chosen),
        )
    if choice == "required" and not tools:
        raise ApiError(400, "tool_choice 'required' needs tools", "tool_choice", "invalid_request")
    if choice == "none" or not tools:
        return None
    parallel = body.parallel_tool_calls is not False
    return ToolSpec(
        definitions=function_definitions(tools),
        mode="required" if choice == "required" else "auto",
        parallel=parallel,
        strict=strict_tools(tools),
    )


def strict_tools(tools: list[ToolDefinition]) -> list[str]:
    """Tools whose `strict: true` asks for their parameters schema exactly (others: keywords the
    grammar library lacks are ignored)."""
    return [tool.function.name for tool in tools if tool.function.strict]


def function_definitions(tools: list[ToolDefinition]) -> list[dict[str, Any]]:
    """OpenAI tools as chat templates take them: no nulls, parameters always an object schema."""
    definitions: list[dict[str, Any]] = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description is not None:
            function["description"] = tool.function.description
        function["parameters"] = tool.function.parameters or {"type": "object", "properties": {}}
        definitions.append({"type": "function", "function": function})
    return definitions


# --- answers ---------------------------------------------------------------------------------


async def chat_completion(
    run: CompletionRun, model: str, receive: Callable[[], Any] | None = None
) -> ChatCompletion:
    results = await collect(run, receive)
    logprobs = run.prepared.request.sampling.logprobs
    choices: list[Choice] = []
    for index, result in enumerate(results):
        calls = [ToolCall(call.id, ToolCallFunction(call.name, call.arguments)) for call in result.tool_calls]
        content: str | None = result.text
        if calls and not result.text.strip():
            content = None
        message = AssistantMessage("assistant", content, calls or None, result.reasoning_text)
        choice_logprobs = ChoiceLogprobs(result.logprobs) if logprobs else None
        choices.append(Choice(index, message, result.ended.reason, choice_logprobs))
    return ChatCompletion(run.completion_id, "chat.completion", run.created, model, choices, run.usage)


async def chat_completion_stream(
    run: CompletionRun, model: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    """Server-sent events as OpenAI sends them: role chunks, content/tool-call chunks, finish chunks,
    the optional usage chunk, [DONE]. A stage failure ends the stream with an error event, no [DONE]."""
    logprobs = run.prepared.request.sampling.logprobs

    def chunk(choice: ChunkChoice) -> bytes:
        return server_sent_event(
            ChatCompletionChunk(run.completion_id, "chat.completion.chunk", run.created, model, [choice])
        )

    for index in range(run.choices):
        yield chunk(ChunkChoice(index, Delta(role="assistant", content="")))
    try:
        async with aclosing(run.events()) as events:
            async for index, event in events:
                match event:
                    case TextDelta(text=text, logprobs=entries):
                        choice_logprobs = ChoiceLogprobs(entries) if logprobs else None
                        yield chunk(ChunkChoice(index, Delta(content=text), logprobs=choice_logprobs))
                    case ReasoningDelta(text=text):
                        yield chunk(ChunkChoice(index, Delta(reasoning_content=text)))
                    case ToolCallMade():
                        header = ToolCallDelta(
                            event.index, ToolCallDeltaFunction(event.name, ""), event.id, "function"
                        )
                        yield chunk(ChunkChoice(index, Delta(tool_calls=[header])))
                        arguments = ToolCallDelta(
                            event.index, ToolCallDeltaFunction(arguments=event.arguments)
                        )
                        yield chunk(ChunkChoice(index, Delta(tool_calls=[arguments])))
                    case ChoiceEnded():
                        yield chunk(ChunkChoice(index, Delta(), event.reason))
    except ServiceError as error:
        yield server_sent_event(error_body(error))
        return
    if include_usage:
        usage = ChatCompletionChunk(
            run.completion_id, "chat.completion.chunk", run.created, model, [], usage=run.usage
        )
        yield server_sent_event(usage)
    yield DONE


def error_body(error: ServiceError) -> ErrorBody:
    _, body = service_error_body(error)
    return body
