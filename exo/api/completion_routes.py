"""The generating routes: OpenAI chat and text completions, Claude messages, Ollama chat/generate,
and cancellation. Each is: decode strictly, translate to a CompletionRequest, prepare (every
plain HTTP error happens there), run, shape the answer in the route's own dialect.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from litestar import Request, post
from litestar.params import HeaderParameter, Parameter, SkipValidation
from litestar.response import Stream

from exo.api import anthropic, ollama
from exo.api.cluster_port import NodeServices, text_tokenizer
from exo.api.completion import CompletionRequest, CompletionSettings, prepare
from exo.api.errors import GENERATE, QUERY, ApiError, decode_strictly, error_responses
from exo.api.ollama_types import ChatChunk, ChatRequest, GenerateChunk, GenerateRequest
from exo.api.openai_chat import chat_completion, chat_completion_stream, chat_request
from exo.api.openai_completions import (
    TextCompletion,
    TextCompletionRequest,
    echo_text,
    text_completion,
    text_completion_stream,
    text_request,
)
from exo.api.openai_types import CancelledCompletion, ChatCompletion, ChatCompletionRequest
from exo.api.runs import ActiveCompletions, CompletionRun

Services = SkipValidation[NodeServices]
Settings = SkipValidation[CompletionSettings]
Registry = SkipValidation[ActiveCompletions]
AnyRequest = Request[Any, Any, Any]
CompletionId = Annotated[str, Parameter(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no"}
NDJSON_HEADERS = {
    "content-type": "application/x-ndjson",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


def event_stream(chunks: AsyncGenerator[bytes, None]) -> Stream:
    # Headers explicitly: Litestar would otherwise take the handler's JSON media type for the stream.
    return Stream(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


def ndjson_stream(chunks: AsyncGenerator[bytes, None]) -> Stream:
    return Stream(chunks, media_type="application/x-ndjson", headers=NDJSON_HEADERS)


async def start(
    services: NodeServices,
    settings: CompletionSettings,
    registry: ActiveCompletions,
    completion: CompletionRequest,
    **run_options: str,
) -> CompletionRun:
    received_at = time.monotonic()
    prepared, tokenizer = await prepare(services, completion, settings)
    return CompletionRun(
        services, prepared, tokenizer, registry=registry, received_at=received_at, **run_options
    )


@post("/v1/chat/completions", status_code=200, responses=error_responses(*GENERATE))
async def chat_completions(
    services: Services,
    settings: Settings,
    registry: Registry,
    request: AnyRequest,
) -> ChatCompletion | Stream:
    """OpenAI chat completions; `"stream": true` answers server-sent events."""
    body = await decode_strictly(request, ChatCompletionRequest)
    run = await start(services, settings, registry, chat_request(body))
    if not body.stream:
        return await chat_completion(run, body.model, request.receive)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    await run.open(request.receive)
    return event_stream(chat_completion_stream(run, body.model, include_usage))


@post("/v1/completions", status_code=200, responses=error_responses(*GENERATE))
async def completions(
    services: Services,
    settings: Settings,
    registry: Registry,
    request: AnyRequest,
) -> TextCompletion | Stream:
    """OpenAI legacy text completions: the prompt as is, no chat template."""
    body = await decode_strictly(request, TextCompletionRequest)
    run = await start(services, settings, registry, text_request(body), id_prefix="cmpl-")
    tokenizer = await services.tokenizer(body.model)
    echo = echo_text(run, body, text_tokenizer(tokenizer).decode)
    if not body.stream:
        return await text_completion(run, body.model, echo, request.receive)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    await run.open(request.receive)
    return event_stream(text_completion_stream(run, body.model, echo, include_usage))


@post("/v1/cancel/{completion_id:str}", status_code=200, responses=error_responses(*QUERY, 404))
async def cancel_completion(registry: Registry, completion_id: CompletionId) -> CancelledCompletion:
    """Stop a completion in progress on this node (any dialect, by the id its answer carries)."""
    if not registry.cancel(completion_id):
        raise ApiError(
            404, f"no completion {completion_id!r} in progress on this node", "completion_id", "not_found"
        )
    return CancelledCompletion(completion_id)


@post("/v1/messages", status_code=200, responses=error_responses(*GENERATE, dialect="anthropic"))
async def claude_messages(
    services: Services,
    settings: Settings,
    registry: Registry,
    request: AnyRequest,
    anthropic_version: Annotated[str, HeaderParameter(name="anthropic-version", min_length=1)],
) -> anthropic.MessageResponse | Stream:
    """Claude's Messages API (the `anthropic-version` header is required, as Anthropic requires it)."""
    body = await decode_strictly(request, anthropic.MessagesRequest)
    completion = anthropic.messages_request(body)
    run = await start(services, settings, registry, completion, id_prefix="msg_", call_id_prefix="toolu")
    if not body.stream:
        return await anthropic.message_response(run, body.model, request.receive)
    await run.open(request.receive)
    return event_stream(anthropic.message_stream(run, body.model))


@post("/ollama/api/chat", status_code=200, responses=error_responses(*GENERATE, dialect="ollama"))
async def ollama_chat(
    services: Services,
    settings: Settings,
    registry: Registry,
    request: AnyRequest,
) -> ChatChunk | Stream:
    """Ollama chat; NDJSON unless `"stream": false`. No messages: load the model and say so."""
    body = await decode_strictly(request, ChatRequest)
    if not body.messages:
        await services.ensure_instance(ollama.model_id(body.model), settings.instance_ready_timeout_s)
        return ChatChunk(body.model, ollama.now(), ollama.AnswerMessage("assistant", ""), True, "load")
    started = time.monotonic()
    run = await start(services, settings, registry, ollama.chat_request(body), id_prefix="ollama-")
    load_seconds = time.monotonic() - started
    if not body.stream:
        return await ollama.chat_answer(run, body.model, load_seconds, request.receive)
    await run.open(request.receive)
    return ndjson_stream(ollama.chat_stream(run, body.model, load_seconds))


@post("/ollama/api/generate", status_code=200, responses=error_responses(*GENERATE, dialect="ollama"))
async def ollama_generate(
    services: Services,
    settings: Settings,
    registry: Registry,
    request: AnyRequest,
) -> GenerateChunk | Stream:
    """Ollama generate; NDJSON unless `"stream": false`. An empty prompt loads the model."""
    body = await decode_strictly(request, GenerateRequest)
    if not body.prompt:
        await services.ensure_instance(ollama.model_id(body.model), settings.instance_ready_timeout_s)
        return GenerateChunk(body.model, ollama.now(), "", True, "load")
    started = time.monotonic()
    run = await start(services, settings, registry, ollama.generate_request(body), id_prefix="ollama-")
    load_seconds = time.monotonic() - started
    if not body.stream:
        return await ollama.generate_answer(run, body.model, load_seconds, request.receive)
    await run.open(request.receive)
    return ndjson_stream(ollama.generate_stream(run, body.model, load_seconds))


COMPLETION_ROUTES = [
    chat_completions,
    completions,
    cancel_completion,
    claude_messages,
    ollama_chat,
    ollama_generate,
]
