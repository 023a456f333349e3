"""The one internal completion request every dialect (OpenAI chat and text, Claude, Ollama) becomes,
and its preparation: prompt tokens, tool rendering, context limit, instance.

Everything here can fail with a plain HTTP error, before any byte of an answer is sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from exo.api.channels import opens_thinking
from exo.api.cluster_port import ChatTokenizer, NodeServices, text_tokenizer
from exo.api.constraints import OutputFormat, ToolSpec, build_grammar, validate_grammar
from exo.api.errors import ApiError
from exo.api.model_limits import context_length
from exo.core.sampling import SamplingParams
from exo.core.state import Instance


class ChatPrompt(msgspec.Struct, frozen=True, tag=True):
    messages: list[dict[str, Any]]  # as Hugging Face chat templates take them
    tools: ToolSpec | None = None
    # Template variables: `enable_thinking` (Qwen 3 and the templates mlx-lm knows) and
    # `reasoning_effort` (gpt-oss); templates ignore the ones they do not use.
    template_options: dict[str, Any] = {}


class TextPrompt(msgspec.Struct, frozen=True, tag=True):
    text: str | None = None  # tokenized with the model's tokenizer
    tokens: list[int] | None = None  # or given as ids


class CompletionRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    prompt: ChatPrompt | TextPrompt
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None  # None: the server default, within the context
    max_tokens_param: str = "max_tokens"  # the request field it came from, for errors
    stop: list[str] = []
    n: int = 1
    output: OutputFormat | None = None  # structured output: the answer must be this JSON


class CompletionSettings(msgspec.Struct, frozen=True):
    """Server-side limits for completions."""

    default_max_tokens: int = 4096
    instance_ready_timeout_s: float = 600.0


class PreparedCompletion(msgspec.Struct, frozen=True, kw_only=True):
    request: CompletionRequest
    instance: Instance
    prompt_tokens: list[int]
    max_tokens: int
    forced_prefix: str = (
        ""  # text the prompt wrote for the model, parsed as output (none now: grammars force calls)
    )


async def prepare(
    services: NodeServices, request: CompletionRequest, settings: CompletionSettings
) -> tuple[PreparedCompletion, ChatTokenizer]:
    tokenizer = await services.tokenizer(request.model)
    tools = None
    if isinstance(request.prompt, ChatPrompt):
        prompt_tokens = render_chat(tokenizer, request.prompt)
        tools = request.prompt.tools
    else:
        prompt_tokens = tokens_of_text(services, tokenizer, request.model, request.prompt)
    max_tokens = check_context(services, request, len(prompt_tokens), settings.default_max_tokens)
    check_logit_bias(services, request)
    thinking_end = None
    if isinstance(request.prompt, ChatPrompt) and opens_thinking(tokenizer, prompt_tokens):
        thinking_end = str(getattr(tokenizer, "think_end", ""))
    grammar = build_grammar(tokenizer, tools, request.output, thinking_end or None)
    if grammar is not None:
        param = request.output.param if request.output is not None else "tools"
        await asyncio.to_thread(validate_grammar, grammar, param)
        sampling = msgspec.structs.replace(request.sampling, grammar=grammar)
        request = msgspec.structs.replace(request, sampling=sampling)
    instance = await services.ensure_instance(request.model, settings.instance_ready_timeout_s)
    prepared = PreparedCompletion(
        request=request,
        instance=instance,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
    )
    return prepared, tokenizer


def render_chat(tokenizer: ChatTokenizer, prompt: ChatPrompt) -> list[int]:
    """The prompt's tokens; a 400 when tools are offered to a template that does not render them."""
    tools = prompt.tools
    options = prompt.template_options
    prompt_tokens = _apply_template(tokenizer, prompt.messages, tools.definitions if tools else None, options)
    if tools is not None and prompt_tokens == _apply_template(tokenizer, prompt.messages, None, options):
        raise ApiError(
            400,
            "this model's chat template does not render tools, so it cannot call them",
            param=tools.param,
            code="tools_unsupported",
        )
    return prompt_tokens


def _apply_template(
    tokenizer: ChatTokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    options: dict[str, Any],
) -> list[int]:
    try:
        if tools is None:
            rendered = tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, **options
            )
        else:
            rendered = tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, tools=tools, **options
            )
        return list(rendered)
    # A chat template is code from the model folder run on client input: whatever it raises
    # (jinja's TemplateError, ValueError, TypeError...) means this conversation is one it refuses.
    except Exception as error:
        message = f"the model's chat template refused the messages: {error}"
        raise ApiError(400, message, param="messages", code="invalid_messages") from error


def tokens_of_text(
    services: NodeServices, tokenizer: ChatTokenizer, model_id: str, prompt: TextPrompt
) -> list[int]:
    if prompt.tokens is not None:
        vocab = _vocab_size(services, model_id)
        if vocab is not None and any(not 0 <= token < vocab for token in prompt.tokens):
            raise ApiError(
                400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_request"
            )
        tokens = list(prompt.tokens)
    else:
        tokens = list(text_tokenizer(tokenizer).encode(prompt.text or ""))
    if not tokens:
        raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_request")
    return tokens


def check_context(
    services: NodeServices, request: CompletionRequest, prompt_length: int, default_max_tokens: int
) -> int:
    """The max_tokens to run with; a 400 when the prompt (and the asked max_tokens) do not fit."""
    limit = _context_length(services, request.model)
    if limit is None:
        return request.max_tokens or default_max_tokens
    if prompt_length >= limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your prompt is "
            f"{prompt_length} tokens, which leaves no room for a completion. Please shorten it.",
            param="messages" if isinstance(request.prompt, ChatPrompt) else "prompt",
            code="context_length_exceeded",
        )
    if request.max_tokens is not None and prompt_length + request.max_tokens > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_length + request.max_tokens} tokens ({prompt_length} in the prompt, "
            f"{request.max_tokens} in the completion). Please reduce the prompt or the completion.",
            param=request.max_tokens_param,
            code="context_length_exceeded",
        )
    return request.max_tokens or min(default_max_tokens, limit - prompt_length)


def check_logit_bias(services: NodeServices, request: CompletionRequest) -> None:
    vocab = _vocab_size(services, request.model)
    bias = request.sampling.logit_bias
    if vocab is not None and any(not 0 <= token < vocab for token in bias):
        raise ApiError(
            400, f"logit_bias token ids must be in [0, {vocab})", param="logit_bias", code="invalid_request"
        )


def _context_length(services: NodeServices, model_id: str) -> int | None:
    for model in services.models():
        if model.model_id == model_id:
            return context_length(model)
    return None


def _vocab_size(services: NodeServices, model_id: str) -> int | None:
    for model in services.models():
        if model.model_id == model_id:
            return model.vocab_size
    return None
