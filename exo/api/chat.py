"""Chat completions: request -> prompt tokens -> generated tokens -> text pieces -> OpenAI bodies.

`prepare_completion` does everything that can fail with a plain HTTP error (unknown model, a
template that refuses the conversation, no capacity) before any byte is sent; after that a
streaming response can only end with an error event.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

import msgspec

from exo.api.errors import ApiError, ErrorBody, service_error_body
from exo.api.openai_types import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ImageContentPart,
    Usage,
)
from exo.api.services import (
    ChatTokenizer,
    FinishReason,
    NodeServices,
    ServiceError,
)
from exo.api.stop_strings import StopStringMatcher
from exo.inference.protocol import SamplingParams
from exo.state import Instance


class CompletionSettings(msgspec.Struct, frozen=True):
    """Server-side limits for completions."""

    default_max_tokens: int = 4096
    instance_ready_timeout_s: float = 600.0


class TextPiece(msgspec.Struct, frozen=True):
    text: str
    finish_reason: FinishReason | None = None


class CompletionRun:
    """One prepared completion. `pieces()` runs it once; the token counts fill in as it goes."""

    def __init__(
        self,
        *,
        services: NodeServices,
        instance: Instance,
        tokenizer: ChatTokenizer,
        prompt_tokens: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        stop_strings: Sequence[str],
    ) -> None:
        self.completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._services = services
        self._instance = instance
        self._tokenizer = tokenizer
        self._prompt_tokens = prompt_tokens
        self._sampling = sampling
        self._max_tokens = max_tokens
        self._stop_strings = stop_strings
        self.completion_tokens = 0

    @property
    def usage(self) -> Usage:
        prompt = len(self._prompt_tokens)
        return Usage(prompt, self.completion_tokens, prompt + self.completion_tokens)

    async def pieces(self) -> AsyncGenerator[TextPiece, None]:
        """Text as it becomes safe to show; the last piece carries the finish reason.

        Leaving early (a stop string, max_tokens reached, the consumer closing this generator)
        closes the token iterator, which cancels the generation on the pipeline.
        """
        detokenizer = self._tokenizer.detokenizer
        end_of_sequence = set(self._tokenizer.eos_token_ids)
        matcher = StopStringMatcher(self._stop_strings)
        services, instance = self._services, self._instance
        tokens = services.generate(instance, self._prompt_tokens, self._sampling, self._max_tokens)
        async with aclosing(tokens):
            async for token in tokens:
                finish_reason = token.finish_reason
                if token.token_id in end_of_sequence:
                    finish_reason = "stop"
                else:
                    self.completion_tokens += 1
                    detokenizer.add_token(token.token_id)
                    if finish_reason is None and self.completion_tokens >= self._max_tokens:
                        finish_reason = "length"
                if finish_reason is not None:
                    detokenizer.finalize()
                text = matcher.feed(detokenizer.last_segment)
                if matcher.stopped:
                    yield TextPiece(text, "stop")
                    return
                if finish_reason is not None:
                    yield TextPiece(text + matcher.flush(), finish_reason)
                    return
                if text:
                    yield TextPiece(text)
        # The iterator ended without a finish reason: treat it as a natural stop.
        detokenizer.finalize()
        text = matcher.feed(detokenizer.last_segment)
        yield TextPiece(text + matcher.flush(), "stop")


async def prepare_completion(
    services: NodeServices, request: ChatCompletionRequest, settings: CompletionSettings
) -> CompletionRun:
    conversation = conversation_from_messages(request.messages)
    tokenizer = await services.tokenizer(request.model)
    prompt_tokens = render_prompt(tokenizer, conversation)
    instance = await services.ensure_instance(request.model, settings.instance_ready_timeout_s)
    return CompletionRun(
        services=services,
        instance=instance,
        tokenizer=tokenizer,
        prompt_tokens=prompt_tokens,
        sampling=sampling_from_request(request),
        max_tokens=request.max_completion_tokens or request.max_tokens or settings.default_max_tokens,
        stop_strings=stop_strings_from_request(request),
    )


def conversation_from_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    conversation: list[dict[str, str]] = []
    for message_index, message in enumerate(messages):
        if message.content is None or isinstance(message.content, str):
            text = message.content or ""
        else:
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
            text = "".join(texts)
        conversation.append({"role": message.role, "content": text})
    return conversation


def render_prompt(tokenizer: ChatTokenizer, conversation: list[dict[str, str]]) -> list[int]:
    try:
        return list(tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True))
    # A chat template is code from the model folder run on client input: whatever it raises
    # (jinja's TemplateError, ValueError, ...) means this conversation is one it refuses.
    except Exception as error:
        message = f"the model's chat template refused the messages: {error}"
        raise ApiError(400, message, param="messages", code="invalid_messages") from error


def sampling_from_request(request: ChatCompletionRequest) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        seed=request.seed,
    )


def stop_strings_from_request(request: ChatCompletionRequest) -> list[str]:
    if request.stop is None:
        return []
    return [request.stop] if isinstance(request.stop, str) else list(request.stop)


async def collect_completion(run: CompletionRun, model: str) -> ChatCompletion:
    texts: list[str] = []
    finish_reason: FinishReason = "stop"
    async with aclosing(run.pieces()) as pieces:
        async for piece in pieces:
            texts.append(piece.text)
            if piece.finish_reason is not None:
                finish_reason = piece.finish_reason
    choice = Choice(0, AssistantMessage("assistant", "".join(texts)), finish_reason)
    return ChatCompletion(run.completion_id, "chat.completion", run.created, model, [choice], run.usage)


_encoder = msgspec.json.Encoder()


def server_sent_event(payload: Any) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


async def stream_completion(
    run: CompletionRun, model: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    """Server-sent events in OpenAI's format: role chunk, content chunks, finish chunk, [DONE].

    A service error mid-stream ends the stream with an `{"error": ...}` event and no [DONE].
    """

    def chunk(delta: Delta, finish_reason: FinishReason | None = None) -> bytes:
        choice = ChunkChoice(0, delta, finish_reason)
        return server_sent_event(
            ChatCompletionChunk(run.completion_id, "chat.completion.chunk", run.created, model, [choice])
        )

    yield chunk(Delta(role="assistant", content=""))
    try:
        async with aclosing(run.pieces()) as pieces:
            async for piece in pieces:
                if piece.text:
                    yield chunk(Delta(content=piece.text))
                if piece.finish_reason is not None:
                    yield chunk(Delta(), piece.finish_reason)
    except ServiceError as error:
        yield server_sent_event(_error_body(error))
        return
    if include_usage:
        usage_chunk = ChatCompletionChunk(
            run.completion_id, "chat.completion.chunk", run.created, model, [], usage=run.usage
        )
        yield server_sent_event(usage_chunk)
    yield b"data: [DONE]\n\n"


def _error_body(error: ServiceError) -> ErrorBody:
    _, body = service_error_body(error)
    return body
