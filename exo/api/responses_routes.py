"""The Responses API routes: create (whole or streamed), retrieve, delete, cancel, input items.

A response runs through the chat path (exo/api/responses.py translates it), under the run's own id
(`resp_...`), so `POST /v1/cancel/{id}` reaches it as it reaches any completion. Responses with
`store` (the default) are kept in this node's ResponseStore, in progress included, so a GET while a
stream runs sees `in_progress`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, delete, get, post
from litestar.params import JSONBody, Parameter, SkipValidation
from litestar.response import Stream

from exo.api.cluster_port import NodeServices, ServiceError
from exo.api.completion import CompletionSettings, prepare
from exo.api.completion_routes import event_stream
from exo.api.errors import GENERATE, QUERY, ApiError, decode_strictly, error_responses
from exo.api.openai_chat import chat_request
from exo.api.responses import responses_params, translate
from exo.api.responses_output import ResponseBuilder
from exo.api.responses_store import ResponseStore, StoredResponse
from exo.api.responses_types import (
    DeletedResponse,
    InputItemList,
    OutputFunctionCall,
    OutputMessage,
    ResponseObject,
    ResponsesRequest,
    StreamEvent,
)
from exo.api.runs import (
    OPEN_READ_TIMEOUT_S,
    ActiveCompletions,
    CompletionRun,
    cancel_on_disconnect,
    server_sent_event,
)

Services = SkipValidation[NodeServices]
Settings = SkipValidation[CompletionSettings]
Registry = SkipValidation[ActiveCompletions]
AnyRequest = Request[Any, Any, Any]
ResponseId = Annotated[str, Parameter(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
MAX_INPUT_ITEMS_PAGE = 100


class LiveResponse(msgspec.Struct):
    builder: ResponseBuilder
    run: CompletionRun
    input_items: list[dict[str, Any]]
    size: int


class Responses:
    """This node's responses: the store, and the ones generating now (for cancel)."""

    def __init__(self, store: ResponseStore | None = None) -> None:
        self.store = store if store is not None else ResponseStore()
        self.live: dict[str, LiveResponse] = {}

    def begin(self, live: LiveResponse) -> None:
        self._prune()
        response_id = live.builder.response_id
        self.live[response_id] = live
        self._keep(live, live.builder.snapshot("in_progress"))

    def _prune(self) -> None:
        """End streams whose body never started (the client left right after the headers): their
        run was cancelled unread (runs.py), and their generator, never started, cannot end them."""
        deadline = time.monotonic() - 2 * OPEN_READ_TIMEOUT_S
        for live in list(self.live.values()):
            if live.run.finished_at is not None and live.run.finished_at < deadline:
                self.end(live)

    def end(self, live: LiveResponse) -> None:
        """The answer is over (finished, failed, or its client gone): keep its last state."""
        builder = live.builder
        self.live.pop(builder.response_id, None)
        if builder.final is None:  # the client went away: what was produced, as cancelled
            builder.finish(None, live.run.usage, cancelled=True)
        assert builder.final is not None
        self._keep(live, builder.final)

    def cancel(self, response_id: str) -> ResponseObject:
        live = self.live.get(response_id)
        if live is not None:
            live.run.cancel()
            return live.builder.snapshot("cancelled")
        stored = _stored(self, response_id)
        raise ApiError(
            400,
            f"response {response_id!r} is {stored.response.status}: only a response in progress can be "
            "cancelled",
            "response_id",
            "response_not_in_progress",
        )

    def _keep(self, live: LiveResponse, response: ResponseObject) -> None:
        if not response.store:
            return
        size = live.size + sum(len(text) for text in _output_texts(response))
        stored = StoredResponse(
            response=response,
            input_items=live.input_items,
            conversation=live.builder.conversation(),
            size=size,
        )
        self.store.put(response.id, stored)


ResponsesDependency = SkipValidation[Responses]


@post("/v1/responses", status_code=200, responses=error_responses(*GENERATE))
async def create_response(  # noqa: PLR0917 (Litestar injects by name)
    services: Services,
    settings: Settings,
    registry: Registry,
    responses: ResponsesDependency,
    request: AnyRequest,
    data: JSONBody[ResponsesRequest],
) -> ResponseObject | Stream:
    """OpenAI's Responses API over the chat path; `"stream": true` answers typed server-sent events."""
    raw = await request.body()
    body = await decode_strictly(request, ResponsesRequest)
    live = await start_response(services, settings, registry, responses, body, len(raw))
    if body.stream:
        await live.run.open(request.receive)
        responses.begin(live)
        return event_stream(response_stream(live, responses))
    responses.begin(live)
    try:
        return await _whole(live, request.receive)
    finally:
        responses.end(live)


@get("/v1/responses/{response_id:str}", responses=error_responses(*QUERY, 404))
async def get_response(responses: ResponsesDependency, response_id: ResponseId) -> ResponseObject:
    return _stored(responses, response_id).response


@delete("/v1/responses/{response_id:str}", status_code=200, responses=error_responses(*QUERY, 404))
async def delete_response(responses: ResponsesDependency, response_id: ResponseId) -> DeletedResponse:
    if not responses.store.delete(response_id):
        raise _not_found(response_id)
    return DeletedResponse(response_id)


@post("/v1/responses/{response_id:str}/cancel", status_code=200, responses=error_responses(*QUERY, 404))
async def cancel_response(responses: ResponsesDependency, response_id: ResponseId) -> ResponseObject:
    """Stop a response still generating on this node; a finished one cannot be cancelled (400)."""
    return responses.cancel(response_id)


@get("/v1/responses/{response_id:str}/input_items", responses=error_responses(*QUERY, 404))
async def list_input_items(
    responses: ResponsesDependency,
    response_id: ResponseId,
    limit: Annotated[int, Parameter(ge=1, le=MAX_INPUT_ITEMS_PAGE)] = 20,
    order: Annotated[Literal["asc", "desc"], Parameter()] = "desc",
    after: Annotated[str | None, Parameter(max_length=128)] = None,
) -> InputItemList:
    """This response's input items, newest first unless `order=asc`; `after` an item id pages on."""
    items = list(_stored(responses, response_id).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(404, f"no input item {after!r} in response {response_id!r}", "after", "not_found")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
    return InputItemList(page, first, last, len(items) > limit)


RESPONSES_ROUTES = [create_response, get_response, delete_response, cancel_response, list_input_items]

# --- internals --------------------------------------------------------------------------------


async def start_response(  # noqa: PLR0917
    services: NodeServices,
    settings: CompletionSettings,
    registry: ActiveCompletions,
    responses: Responses,
    body: ResponsesRequest,
    request_bytes: int,
) -> LiveResponse:
    """Every check and the preparation (each failure a plain HTTP error), then the run, not started."""
    if body.background:
        message = "background responses are not supported: exo answers while the request is open"
        raise ApiError(400, message, "background", "unsupported_parameter")
    previous = None
    if body.previous_response_id is not None:
        previous = responses.store.get(body.previous_response_id)
        if previous is None:
            raise ApiError(
                404,
                f"Previous response with id {body.previous_response_id!r} not found (this node keeps "
                f"stored responses for {responses.store.ttl_s:g} s, at most {responses.store.max_entries})",
                "previous_response_id",
                "previous_response_not_found",
            )
    with responses_params():
        translated = translate(body, previous)
        completion = msgspec.structs.replace(
            chat_request(translated.chat), max_tokens_param="max_output_tokens"
        )
        prepared, tokenizer = await prepare(services, completion, settings)
    run = CompletionRun(services, prepared, tokenizer, id_prefix="resp_", registry=registry)
    builder = ResponseBuilder(run.completion_id, body, translated, run.created)
    return LiveResponse(builder, run, translated.input_items, request_bytes)


async def _whole(live: LiveResponse, receive: Callable[[], Any]) -> ResponseObject:
    run, builder = live.run, live.builder
    watcher = asyncio.create_task(cancel_on_disconnect(receive, run))
    ended = None
    try:
        async with contextlib.aclosing(run.events()) as events:
            async for _, event in events:
                builder.feed(event)
                ended = run.decoders[0].ended
    except ServiceError as error:
        builder.fail(str(error), run.usage)
        raise
    finally:
        watcher.cancel()
    builder.finish(ended, run.usage, cancelled=run.cancelled)
    assert builder.final is not None
    return builder.final


async def response_stream(live: LiveResponse, responses: Responses) -> AsyncGenerator[bytes, None]:
    run, builder = live.run, live.builder
    try:
        for event in builder.start():
            yield _sse(event)
        try:
            async with contextlib.aclosing(run.events()) as events:
                async for _, event in events:
                    for streamed in builder.feed(event):
                        yield _sse(streamed)
        except ServiceError as error:
            for streamed in builder.fail(str(error), run.usage):
                yield _sse(streamed)
            return
        for streamed in builder.finish(run.decoders[0].ended, run.usage, cancelled=run.cancelled):
            yield _sse(streamed)
    finally:
        responses.end(live)


def _sse(event: StreamEvent) -> bytes:
    return server_sent_event(event, event=event.type)


def _stored(responses: Responses, response_id: str) -> StoredResponse:
    stored = responses.store.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id {response_id!r} not found.", "response_id", "response_not_found")


def _output_texts(response: ResponseObject) -> list[str]:
    texts: list[str] = []
    for item in response.output:
        match item:
            case OutputMessage():
                texts += [part.text for part in item.content]
            case OutputFunctionCall():
                texts.append(item.arguments)
    return texts
