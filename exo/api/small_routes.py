"""Small routes clients call besides generating: Claude's token counting, and the embedding routes
(OpenAI's and Ollama's), which answer 501 `not_supported` until exo serves embeddings, so a client
sees "this server cannot" rather than a 404 that looks like a wrong base URL.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, JSONBody, SkipValidation

from exo.api import anthropic
from exo.api.cluster_port import NodeServices
from exo.api.completion import ChatPrompt, render_chat
from exo.api.errors import BODY, ErrorBody, ErrorDetail, decode_strictly, error_responses
from exo.api.openai_types import NonEmptyString

Services = SkipValidation[NodeServices]
NOT_SUPPORTED = "not_supported"
EMBEDDINGS_MESSAGE = "embeddings are not supported: exo serves text generation models only"


class CountTokensRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Claude's count_tokens body: a Messages request without `max_tokens` (other fields ignored)."""

    model: NonEmptyString
    messages: Annotated[list[anthropic.Message], msgspec.Meta(min_length=1)]
    system: str | list[anthropic.TextBlock] | None = None
    tools: list[anthropic.Tool] | None = None
    tool_choice: anthropic.ToolChoice | None = None


class TokenCount(msgspec.Struct, frozen=True):
    input_tokens: int


class OllamaNotSupported(msgspec.Struct, frozen=True):
    error: str  # what Ollama clients read
    code: str = NOT_SUPPORTED


@post(
    "/v1/messages/count_tokens",
    status_code=200,
    responses=error_responses(*BODY, 404, dialect="anthropic"),
)
async def count_tokens(
    services: Services,
    request: Request[Any, Any, Any],
    data: JSONBody[CountTokensRequest],
    anthropic_version: Annotated[str, HeaderParameter(name="anthropic-version", min_length=1)],
) -> TokenCount:
    """The prompt tokens `POST /v1/messages` would send the model for this body (its
    `usage.input_tokens`): system, tools and messages rendered by the model's chat template."""
    body = await decode_strictly(request, CountTokensRequest)
    as_message = anthropic.MessagesRequest(
        model=body.model,
        messages=body.messages,
        max_tokens=1,
        system=body.system,
        tools=body.tools,
        tool_choice=body.tool_choice,
    )
    prompt = anthropic.messages_request(as_message).prompt
    assert isinstance(prompt, ChatPrompt)
    tokenizer = await services.tokenizer(body.model)
    tokens = render_chat(tokenizer, prompt)
    return TokenCount(len(tokens))


def _not_supported_spec(body: type[msgspec.Struct]) -> dict[int, ResponseSpec]:
    spec = ResponseSpec(
        data_container=body, description="Embeddings are not supported", generate_examples=False
    )
    return {501: spec}


@post("/v1/embeddings", status_code=501, responses=_not_supported_spec(ErrorBody))
async def openai_embeddings() -> Response[ErrorBody]:
    """Not supported yet: 501 with code `not_supported`."""
    detail = ErrorDetail(EMBEDDINGS_MESSAGE, "invalid_request_error", None, NOT_SUPPORTED)
    return Response(ErrorBody(detail), status_code=501)


@post(
    ["/ollama/api/embed", "/ollama/api/embeddings"],
    status_code=501,
    responses=_not_supported_spec(OllamaNotSupported),
)
async def ollama_embeddings() -> Response[OllamaNotSupported]:
    """Not supported yet: 501 with Ollama's `error` text and code `not_supported`."""
    return Response(OllamaNotSupported(EMBEDDINGS_MESSAGE), status_code=501)


SMALL_ROUTES = [count_tokens, openai_embeddings, ollama_embeddings]
