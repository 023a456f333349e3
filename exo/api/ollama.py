"""Ollama's API under `/ollama/api/*`, as a thin translation onto CompletionRequest.

Chat and generate stream newline-delimited JSON by default (`"stream": false` for one object);
the last object has `done: true`, `done_reason` and the timings. Model names are listed as
`ID:latest`, and a request may name a model with or without the `:latest` tag.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import msgspec

from exo.api.cluster_port import ServiceError
from exo.api.completion import ChatPrompt, CompletionRequest, TextPrompt, ToolSpec
from exo.api.constraints import OutputFormat
from exo.api.decoding import ChoiceEnded, ReasoningDelta, TextDelta, ToolCallMade
from exo.api.errors import ApiError, service_error_body
from exo.api.model_limits import context_length
from exo.api.ollama_types import (
    AnswerMessage,
    ChatChunk,
    ChatRequest,
    Format,
    GenerateChunk,
    GenerateRequest,
    ListedModel,
    Message,
    ModelDetails,
    Options,
    ToolCall,
    ToolCallFunction,
)
from exo.api.openai_chat import function_definitions, sampling_params
from exo.api.runs import ChoiceResult, CompletionRun, collect
from exo.core.models import ModelInfo
from exo.core.sampling import SamplingParams

OLLAMA_VERSION = "0.12.0"  # the Ollama API version these routes follow
LATEST = ":latest"
# Ollama's own defaults, so its clients get what they expect when they set nothing.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_encoder = msgspec.json.Encoder()


def model_id(name: str) -> str:
    return name.removesuffix(LATEST)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat().replace("+00:00", "Z")


# --- requests --------------------------------------------------------------------------------


def output_format(format_: Format) -> OutputFormat | None:
    """Ollama's `format`: "json" is any JSON object, an object is a JSON schema. As Ollama's own
    schema-to-grammar conversion, keywords the grammar library lacks are ignored."""
    if format_ is None or format_ == "":
        return None
    if format_ == "json":
        return OutputFormat(schema=None, param="format")
    if isinstance(format_, dict):
        return OutputFormat(schema=format_, strict=False, param="format")
    raise ApiError(
        400, f'format must be "json" or a JSON schema, got {format_!r}', "format", "invalid_request"
    )


def think_options(think: bool | str | None) -> dict[str, Any]:
    """Ollama's `think`: false turns thinking off in templates that can, true or a level ("low",
    "medium", "high", which gpt-oss templates take as `reasoning_effort`) turns it on. Thinking is
    separated into `thinking` whenever the model writes its markers."""
    if think is None:
        return {}
    if think is False:
        return {"enable_thinking": False}
    if think is True:
        return {"enable_thinking": True}
    if think not in ("low", "medium", "high"):
        raise ApiError(
            400,
            f'think must be a boolean or "low", "medium", "high", got {think!r}',
            "think",
            "invalid_request",
        )
    return {"enable_thinking": True, "reasoning_effort": think}


def _options_sampling(options: Options | None) -> tuple[SamplingParams, int | None, list[str]]:
    options = options or Options()
    sampling = sampling_params(
        temperature=options.temperature,
        top_p=DEFAULT_TOP_P if options.top_p is None else options.top_p,
        top_k=DEFAULT_TOP_K if options.top_k is None else options.top_k,
        min_p=options.min_p,
        seed=options.seed,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repeat_penalty,
        default_temperature=DEFAULT_TEMPERATURE,
    )
    max_tokens = options.num_predict if options.num_predict is not None and options.num_predict > 0 else None
    return sampling, max_tokens, list(options.stop or [])


def chat_request(body: ChatRequest) -> CompletionRequest:
    sampling, max_tokens, stop = _options_sampling(body.options)
    tools = ToolSpec(definitions=function_definitions(body.tools)) if body.tools else None
    return CompletionRequest(
        model=model_id(body.model),
        prompt=ChatPrompt(conversation(body.messages), tools, think_options(body.think)),
        sampling=sampling,
        max_tokens=max_tokens,
        max_tokens_param="options.num_predict",
        stop=stop,
        output=output_format(body.format),
    )


def conversation(messages: list[Message]) -> list[dict[str, Any]]:
    rendered: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if message.images:
            raise ApiError(
                400,
                "images are not supported: exo serves text models",
                f"messages[{index}].images",
                "unsupported_content",
            )
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            entry["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in message.tool_calls
            ]
        if message.tool_name is not None:
            entry["name"] = message.tool_name
        rendered.append(entry)
    return rendered


def generate_request(body: GenerateRequest) -> CompletionRequest:
    for field, value in (
        ("suffix", body.suffix),
        ("template", body.template),
        ("context", body.context),
        ("images", body.images),
    ):
        if value:
            raise ApiError(400, f"{field} is not supported", field, "invalid_request")
    sampling, max_tokens, stop = _options_sampling(body.options)
    if body.raw:
        prompt: ChatPrompt | TextPrompt = TextPrompt(text=body.prompt)
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        prompt = ChatPrompt(
            [*messages, {"role": "user", "content": body.prompt}], None, think_options(body.think)
        )
    return CompletionRequest(
        model=model_id(body.model),
        prompt=prompt,
        sampling=sampling,
        max_tokens=max_tokens,
        max_tokens_param="options.num_predict",
        stop=stop,
        output=output_format(body.format),
    )


# --- answers ---------------------------------------------------------------------------------


def _timings(run: CompletionRun, load_seconds: float) -> dict[str, int]:
    finished = run.finished_at or time.monotonic()
    first = run.first_token_at or finished
    nanoseconds = 1_000_000_000
    return {
        "total_duration": int((finished - run.started_at + load_seconds) * nanoseconds),
        "load_duration": int(load_seconds * nanoseconds),
        "prompt_eval_count": run.prompt_tokens,
        "prompt_eval_duration": int((first - run.started_at) * nanoseconds),
        "eval_count": run.completion_tokens,
        "eval_duration": int((finished - first) * nanoseconds),
    }


def _tool_call(call: ToolCallMade) -> ToolCall:
    return ToolCall(ToolCallFunction(call.name, json.loads(call.arguments), call.index))


def _done_reason(ended: ChoiceEnded) -> str:
    return "length" if ended.reason == "length" else "stop"


def _final_chat(run: CompletionRun, model: str, result: ChoiceResult, load_seconds: float) -> ChatChunk:
    calls = [_tool_call(call) for call in result.tool_calls] or None
    message = AnswerMessage("assistant", result.text, tool_calls=calls, thinking=result.reasoning_text)
    return ChatChunk(model, now(), message, True, _done_reason(result.ended), **_timings(run, load_seconds))


async def chat_answer(
    run: CompletionRun, model: str, load_seconds: float, receive: Callable[[], Any] | None
) -> ChatChunk:
    (result,) = await collect(run, receive)
    return _final_chat(run, model, result, load_seconds)


async def chat_stream(run: CompletionRun, model: str, load_seconds: float) -> AsyncGenerator[bytes, None]:
    try:
        async with aclosing(run.events()) as events:
            async for _, event in events:
                match event:
                    case TextDelta(text=text) if text:
                        yield _line(ChatChunk(model, now(), AnswerMessage("assistant", text), False))
                    case ReasoningDelta(text=text):
                        message = AnswerMessage("assistant", "", thinking=text)
                        yield _line(ChatChunk(model, now(), message, False))
                    case ToolCallMade():
                        yield _line(
                            ChatChunk(
                                model,
                                now(),
                                AnswerMessage("assistant", "", tool_calls=[_tool_call(event)]),
                                False,
                            )
                        )
                    case ChoiceEnded():
                        final = ChatChunk(
                            model, now(), AnswerMessage("assistant", ""), True, _done_reason(event)
                        )
                        yield _line(msgspec.structs.replace(final, **_timings(run, load_seconds)))
                    case _:
                        pass
    except ServiceError as error:
        yield _line({"error": service_error_body(error)[1].error.message})


async def generate_answer(
    run: CompletionRun, model: str, load_seconds: float, receive: Callable[[], Any] | None
) -> GenerateChunk:
    (result,) = await collect(run, receive)
    return GenerateChunk(
        model,
        now(),
        result.text,
        True,
        _done_reason(result.ended),
        thinking=result.reasoning_text,
        **_timings(run, load_seconds),
    )


async def generate_stream(run: CompletionRun, model: str, load_seconds: float) -> AsyncGenerator[bytes, None]:
    try:
        async with aclosing(run.events()) as events:
            async for _, event in events:
                match event:
                    case TextDelta(text=text) if text:
                        yield _line(GenerateChunk(model, now(), text, False))
                    case ReasoningDelta(text=text):
                        yield _line(GenerateChunk(model, now(), "", False, thinking=text))
                    case ChoiceEnded():
                        final = GenerateChunk(model, now(), "", True, _done_reason(event))
                        yield _line(msgspec.structs.replace(final, **_timings(run, load_seconds)))
                    case _:
                        pass
    except ServiceError as error:
        yield _line({"error": service_error_body(error)[1].error.message})


def _line(payload: object) -> bytes:
    return _encoder.encode(payload) + b"\n"


# --- models ----------------------------------------------------------------------------------


def details(model: ModelInfo) -> ModelDetails:
    parameters = model.total_weight_bytes / _DTYPE_BYTES.get(model.dtype, 4)
    size = f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"
    return ModelDetails(
        "", "safetensors", model.architecture, [model.architecture], size, model.dtype.upper()
    )


def digest(model: ModelInfo) -> str:
    return hashlib.sha256(f"{model.model_id}:{model.total_weight_bytes}".encode()).hexdigest()


def modified_at(model: ModelInfo) -> str:
    try:
        return timestamp((Path(model.path) / "config.json").stat().st_mtime)
    except OSError:
        return timestamp(0)


def listed(model: ModelInfo) -> ListedModel:
    name = model.model_id + LATEST
    return ListedModel(
        name, name, modified_at(model), model.total_weight_bytes, digest(model), details(model)
    )


def model_info_fields(model: ModelInfo) -> dict[str, Any]:
    architecture = model.architecture
    fields: dict[str, Any] = {
        "general.architecture": architecture,
        "general.parameter_count": int(model.total_weight_bytes / _DTYPE_BYTES.get(model.dtype, 4)),
        f"{architecture}.block_count": model.n_layers,
        f"{architecture}.embedding_length": model.hidden_size,
        f"{architecture}.vocab_size": model.vocab_size,
    }
    limit = context_length(model)
    if limit is not None:
        fields[f"{architecture}.context_length"] = limit
    return fields
