"""OpenAI's legacy text completions (`POST /v1/completions`): a raw prompt, no chat template."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Annotated, Any, Literal

import msgspec

from exo.api.cluster_port import ServiceError
from exo.api.completion import CompletionRequest, TextPrompt
from exo.api.decoding import ChoiceEnded, TextDelta
from exo.api.errors import ApiError
from exo.api.openai_chat import DONE, error_body, openai_sampling, stop_strings
from exo.api.openai_types import (
    Choices,
    LogitBias,
    MinP,
    NonEmptyString,
    Penalty,
    PositiveInt,
    RepetitionPenalty,
    Stop,
    StreamOptions,
    Temperature,
    TokenLogprob,
    TopK,
    TopP,
    Usage,
)
from exo.api.runs import CompletionRun, collect, server_sent_event
from exo.core.sampling import MAX_TOP_LOGPROBS

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint

Prompt = str | list[str | int | list[int]]


class TextCompletionRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: NonEmptyString
    prompt: Prompt
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    seed: int | None = None
    stop: Stop = None
    n: Choices = 1
    best_of: Choices | None = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    repetition_penalty: RepetitionPenalty = None
    logit_bias: LogitBias = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    user: str | None = None


class CompletionLogprobs(msgspec.Struct, frozen=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(msgspec.Struct, frozen=True):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class TextCompletion(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


def text_request(body: TextCompletionRequest) -> CompletionRequest:
    if body.stream_options is not None and not body.stream:
        raise ApiError(
            400, "stream_options is only allowed with stream: true", "stream_options", "invalid_request"
        )
    if body.suffix:
        raise ApiError(400, "suffix (insertion) is not supported", "suffix", "invalid_request")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(
            400, "best_of must equal n: exo returns every choice it generates", "best_of", "invalid_request"
        )
    if body.echo and body.logprobs is not None:
        raise ApiError(
            400, "echo with logprobs is not supported (no prompt logprobs)", "echo", "invalid_request"
        )
    return CompletionRequest(
        model=body.model,
        prompt=single_prompt(body.prompt),
        sampling=openai_sampling(body, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0),
        max_tokens=body.max_tokens or DEFAULT_MAX_TOKENS,
        stop=stop_strings(body.stop),
        n=body.n,
    )


def single_prompt(prompt: Prompt) -> TextPrompt:
    """A string, a list of one string, a list of token ids, or a list of one list of token ids."""
    if isinstance(prompt, str):
        return TextPrompt(text=prompt)
    if all(isinstance(item, int) for item in prompt):
        return TextPrompt(tokens=[item for item in prompt if isinstance(item, int)])
    if len(prompt) == 1:
        (only,) = prompt
        if isinstance(only, str):
            return TextPrompt(text=only)
        if isinstance(only, list):
            return TextPrompt(tokens=only)
    raise ApiError(
        400, "one prompt per request: a string or a list of token ids", "prompt", "invalid_request"
    )


def echo_text(run: CompletionRun, body: TextCompletionRequest, decode: Callable[[list[int]], str]) -> str:
    if not body.echo:
        return ""
    prompt = run.prepared.request.prompt
    assert isinstance(prompt, TextPrompt)
    return prompt.text if prompt.text is not None else decode(prompt.tokens or [])


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    offsets: list[int] = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(
        tokens=[entry.token for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[{top.token: top.logprob for top in entry.top_logprobs} for entry in entries],
        text_offset=offsets,
    )


async def text_completion(
    run: CompletionRun, model: str, echo: str, receive: Callable[[], Any] | None
) -> TextCompletion:
    results = await collect(run, receive)
    wants_logprobs = run.prepared.request.sampling.logprobs
    choices = [
        TextChoice(
            echo + result.text,
            index,
            completion_logprobs(result.logprobs, len(echo)) if wants_logprobs else None,
            "length" if result.ended.reason == "length" else "stop",
        )
        for index, result in enumerate(results)
    ]
    return TextCompletion(run.completion_id, "text_completion", run.created, model, choices, run.usage)


async def text_completion_stream(
    run: CompletionRun, model: str, echo: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    wants_logprobs = run.prepared.request.sampling.logprobs
    offsets = [len(echo)] * run.choices

    def chunk(choice: TextChoice) -> bytes:
        return server_sent_event(
            TextCompletion(run.completion_id, "text_completion", run.created, model, [choice])
        )

    if echo:
        for index in range(run.choices):
            yield chunk(TextChoice(echo, index))
    try:
        async with aclosing(run.events()) as events:
            async for index, event in events:
                match event:
                    case TextDelta(text=text, logprobs=entries):
                        logprobs = completion_logprobs(entries, offsets[index]) if wants_logprobs else None
                        offsets[index] += sum(len(entry.token) for entry in entries)
                        yield chunk(TextChoice(text, index, logprobs))
                    case ChoiceEnded():
                        yield chunk(
                            TextChoice("", index, None, "length" if event.reason == "length" else "stop")
                        )
                    case _:
                        pass  # no tools on this endpoint
    except ServiceError as error:
        yield server_sent_event(error_body(error))
        return
    if include_usage:
        usage = TextCompletion(run.completion_id, "text_completion", run.created, model, [], run.usage)
        yield server_sent_event(usage)
    yield DONE
