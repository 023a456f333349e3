"""The HTTP API: `create_app(services)` builds the Litestar app the node serves on `--api-port`.

Controllers are thin: parse (Litestar + msgspec), call `NodeServices`, shape the answer. Errors of
every kind come out as OpenAI error objects (exo/api/errors.py).
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Response, delete, get, post
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter, SkipValidation

from exo.api import ollama
from exo.api.anthropic import MessagesRequest
from exo.api.cluster_port import InstanceNotFound, ModelNotFound, NodeServices, NodeTimings, text_tokenizer
from exo.api.completion import CompletionSettings
from exo.api.completion_routes import COMPLETION_ROUTES
from exo.api.dashboard_routes import DASHBOARD_ROUTES
from exo.api.errors import BODY, EXCEPTION_HANDLERS, QUERY, READ, decode_strictly, error_responses
from exo.api.live_feed import LiveFeed
from exo.api.model_limits import context_length
from exo.api.model_routes import MODEL_ROUTES
from exo.api.model_routes import REQUEST_BODIES as MODEL_REQUEST_BODIES
from exo.api.ollama_types import ChatRequest as OllamaChatRequest
from exo.api.ollama_types import (
    GenerateRequest,
    ModelTags,
    RunningModel,
    RunningModels,
    ShowRequest,
    ShowResponse,
    Version,
)
from exo.api.openai_completions import TextCompletionRequest
from exo.api.openai_types import ChatCompletionRequest, ModelList, ModelObject
from exo.api.openapi import render_plugins
from exo.api.responses_routes import RESPONSES_ROUTES, Responses
from exo.api.responses_store import ResponseStore
from exo.api.responses_types import ResponsesRequest
from exo.api.runs import ActiveCompletions
from exo.api.small_routes import SMALL_ROUTES, CountTokensRequest
from exo.api.telemetry import Telemetry, count_requests
from exo.core.events import Event, IndexedEvent, Sharding
from exo.core.models import ModelInfo
from exo.core.placement import PlacementPreview
from exo.core.state import Instance, State, state_document

MAX_EVENTS_PAGE = 1000
MAX_REQUEST_BYTES = 16 * 1024 * 1024
PUBLIC = {"public": True}
# /state sends state_document's bytes (for byte equality with exo-replay); they are a State.
STATE_RESPONSES = {
    200: ResponseSpec(data_container=State, description="The state document", generate_examples=False),
    **error_responses(*READ),
}

InstanceId = Annotated[str, Parameter(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", max_length=128)]
# Dependencies are ours, not client input: no validation (a Protocol cannot be isinstance-checked).
Services = SkipValidation[NodeServices]
ModelId = Annotated[str, Parameter(min_length=1, max_length=256)]


class Health(msgspec.Struct, frozen=True):
    status: str


class IndexedEventDocument(msgspec.Struct, frozen=True):
    """An indexed event as JSON: named fields (the wire form is a msgpack array)."""

    index: int
    term: int
    origin_node_id: str
    origin_sequence: int
    event: Event


class PlaceInstanceRequest(msgspec.Struct, frozen=True, kw_only=True):
    # Unknown fields are ignored: upstream exo clients send `instance_meta` too.
    model_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    sharding: Sharding = "Pipeline"
    min_nodes: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1


class PlacementPreviews(msgspec.Struct, frozen=True):
    model_id: str
    previews: list[PlacementPreview]


class RemovedNode(msgspec.Struct, frozen=True):
    node_id: str
    removed: bool = True


class DeletedInstance(msgspec.Struct, frozen=True):
    instance_id: str
    deleted: bool = True


@get("/health", opt=PUBLIC)
async def health() -> Health:
    return Health("ok")


@get("/node_id", media_type="application/json", responses=error_responses(*READ))
async def node_id(services: Services) -> Response[bytes]:
    # A JSON string, as upstream exo answers.
    return Response(msgspec.json.encode(services.node_id), media_type="application/json")


@get("/node_status", responses=error_responses(*READ))
async def node_status(services: Services) -> dict[str, object]:
    return services.node_status()


@get("/state", media_type="application/json", responses=STATE_RESPONSES)
async def state(services: Services) -> Response[bytes]:
    # Exactly state_document's bytes: `exo-replay --json` must be able to match it byte for byte.
    return Response(state_document(services.state()), media_type="application/json")


@get("/events", responses=error_responses(*QUERY))
async def events(
    services: Services,
    since: Annotated[int, Parameter(ge=0)] = 0,
    limit: Annotated[int, Parameter(ge=1, le=MAX_EVENTS_PAGE)] = MAX_EVENTS_PAGE,
) -> list[IndexedEventDocument]:
    indexed_events = await services.events_since(since, limit)
    return [_event_document(indexed) for indexed in indexed_events[:limit]]


@get("/models", responses=error_responses(*READ))
async def models(services: Services) -> ModelList:
    """Every model in the models dir; unsupported ones say why."""
    return ModelList("list", [_model_object(model) for model in services.models()])


@get("/v1/models", responses=error_responses(*READ))
async def openai_models(services: Services) -> ModelList:
    """The models this node can serve, in OpenAI's list shape."""
    return ModelList("list", [_model_object(model) for model in services.models() if model.supported])


@post("/place_instance", status_code=200, responses=error_responses(*BODY, 404, 503))
async def place_instance(services: Services, request: Request[Any, Any, Any]) -> Instance:
    data = await decode_strictly(request, PlaceInstanceRequest)
    return await services.place_instance(data.model_id, data.sharding, data.min_nodes)


@get("/instance/previews", responses=error_responses(*QUERY, 403, 404, 503))
async def instance_previews(services: Services, model_id: ModelId) -> PlacementPreviews:
    return PlacementPreviews(model_id, await services.previews(model_id))


@get("/instance/{instance_id:str}", responses=error_responses(*QUERY, 404))
async def get_instance(services: Services, instance_id: InstanceId) -> Instance:
    instance = services.state().instances.get(instance_id)
    if instance is None:
        raise InstanceNotFound(instance_id)
    return instance


@delete("/instance/{instance_id:str}", status_code=200, responses=error_responses(*QUERY, 404, 503))
async def delete_instance(services: Services, instance_id: InstanceId) -> DeletedInstance:
    await services.delete_instance(instance_id)
    return DeletedInstance(instance_id)


@delete("/node/{node_id:str}", status_code=200, responses=error_responses(*QUERY, 404, 409, 503))
async def remove_node(services: Services, node_id: InstanceId) -> RemovedNode:
    """`exo cluster remove NODE`: a member gone for good leaves the cluster (refused while it answers)."""
    await services.remove_node(node_id)
    return RemovedNode(node_id)


@get("/v1/models/{model_id:path}", responses=error_responses(*QUERY, 404))
async def openai_model(services: Services, model_id: ModelId) -> ModelObject:
    """One model, as OpenAI's `models.retrieve` reads it (a Hub id `org/name` has a slash)."""
    return _model_object(_find_model(services, model_id.lstrip("/"), supported_only=True))


@get("/ollama", media_type="text/plain", responses=error_responses(*READ, dialect="ollama"))
async def ollama_root() -> str:
    """What Ollama answers at its root; clients probe it to see the server is up."""
    return "Ollama is running"


@get("/ollama/api/version", responses=error_responses(*READ, dialect="ollama"))
async def ollama_version() -> Version:
    return Version(ollama.OLLAMA_VERSION)


@get("/ollama/api/tags", responses=error_responses(*READ, dialect="ollama"))
async def ollama_tags(services: Services) -> ModelTags:
    """The models this node can serve, named `ID:latest`."""
    return ModelTags([ollama.listed(model) for model in services.models() if model.supported])


@get("/ollama/api/ps", responses=error_responses(*READ, dialect="ollama"))
async def ollama_running(services: Services) -> RunningModels:
    """Models with a ready instance in the cluster."""
    ready = {
        instance.model_id for instance in services.state().instances.values() if instance.status == "ready"
    }
    running: list[RunningModel] = []
    for model in services.models():
        if model.model_id in ready:
            listed = ollama.listed(model)
            never = ollama.timestamp(4102444800)  # 2100-01-01: instances stay until deleted
            running.append(
                RunningModel(listed.name, listed.model, listed.size, listed.digest, listed.details, never, 0)
            )
    return RunningModels(running)


@post("/ollama/api/show", status_code=200, responses=error_responses(*BODY, 404, dialect="ollama"))
async def ollama_show(services: Services, request: Request[Any, Any, Any]) -> ShowResponse:
    """A model's details, template and capabilities."""
    body = await decode_strictly(request, ShowRequest)
    model = _find_model(services, ollama.model_id(body.model), supported_only=True)
    tokenizer = await services.tokenizer(model.model_id)
    source = text_tokenizer(tokenizer).chat_template
    template = source if isinstance(source, str) else ""
    capabilities = ["completion", *(["tools"] if "tools" in template else [])]
    if getattr(tokenizer, "has_thinking", False):  # mlx-lm found thinking markers: Ollama's `think` applies
        capabilities.append("thinking")
    return ShowResponse(
        modelfile="",
        parameters="",
        template=template,
        details=ollama.details(model),
        model_info=ollama.model_info_fields(model),
        capabilities=capabilities,
        modified_at=ollama.modified_at(model),
    )


def _find_model(services: NodeServices, model_id: str, *, supported_only: bool) -> ModelInfo:
    for model in services.models():
        if model.model_id == model_id and (model.supported or not supported_only):
            return model
    raise ModelNotFound(model_id)


# Every route with a JSON body -> its type (the OpenAPI schema describes it with msgspec's schema).
REQUEST_BODIES: dict[tuple[str, str], type[Any]] = {
    ("post", "/place_instance"): PlaceInstanceRequest,
    ("post", "/ollama/api/show"): ShowRequest,
    ("post", "/v1/chat/completions"): ChatCompletionRequest,
    ("post", "/v1/completions"): TextCompletionRequest,
    ("post", "/v1/messages"): MessagesRequest,
    ("post", "/ollama/api/chat"): OllamaChatRequest,
    ("post", "/ollama/api/generate"): GenerateRequest,
    ("post", "/v1/responses"): ResponsesRequest,
    ("post", "/v1/messages/count_tokens"): CountTokensRequest,
    **MODEL_REQUEST_BODIES,
}


def create_app(
    services: Services,
    api_key: str | None = None,
    *,
    completion_settings: CompletionSettings | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    response_store: ResponseStore | None = None,
    manage_models: bool = False,
    feed: LiveFeed | None = None,
    metrics_public: bool = False,
) -> Litestar:
    """The API over `services`. With `api_key`, every route but `GET /health` (and the dashboard's
    page and assets, and `/metrics` with `metrics_public`) needs it as a bearer token.
    `response_store` bounds the Responses API's stored responses (default: 1,000 for 1 h). `feed`
    is where the node publishes applied events for the dashboard's live stream.

    `manage_models`: `services` also implements exo.api.model_routes.ModelServices (the node's
    does): `/models` then shows each node's state of each model, and models can be fetched
    and deleted."""
    settings = completion_settings or CompletionSettings()
    live_feed = feed if feed is not None else LiveFeed()
    timings = services.stage_timings if isinstance(services, NodeTimings) else None
    telemetry = Telemetry(services.node_status, live_feed, stage_timings=timings, state=services.state)
    registry = ActiveCompletions(observer=telemetry)
    responses = Responses(response_store)

    def provide_services() -> NodeServices:
        return services

    def provide_settings() -> CompletionSettings:
        return settings

    def provide_registry() -> ActiveCompletions:
        return registry

    def provide_responses() -> Responses:
        return responses

    def provide_feed() -> LiveFeed:
        return live_feed

    def provide_telemetry() -> Telemetry:
        return telemetry

    return Litestar(
        route_handlers=[
            health,
            node_id,
            node_status,
            state,
            events,
            *(MODEL_ROUTES if manage_models else [models]),
            openai_models,
            place_instance,
            instance_previews,
            get_instance,
            delete_instance,
            remove_node,
            openai_model,
            ollama_root,
            ollama_version,
            ollama_tags,
            ollama_running,
            ollama_show,
            *COMPLETION_ROUTES,
            *RESPONSES_ROUTES,
            *SMALL_ROUTES,
            *DASHBOARD_ROUTES,
        ],
        dependencies={
            "services": Provide(provide_services, sync_to_thread=False),
            "settings": Provide(provide_settings, sync_to_thread=False),
            "registry": Provide(provide_registry, sync_to_thread=False),
            "responses": Provide(provide_responses, sync_to_thread=False),
            "feed": Provide(provide_feed, sync_to_thread=False),
            "telemetry": Provide(provide_telemetry, sync_to_thread=False),
        },
        middleware=[count_requests(telemetry)],
        guards=[] if api_key is None else [_require_api_key(api_key, metrics_public=metrics_public)],
        exception_handlers=EXCEPTION_HANDLERS,
        cors_config=CORSConfig(allow_origins=["*"], allow_headers=["*"], allow_methods=["*"]),
        openapi_config=OpenAPIConfig(
            title="exo", version="0.1.0", path="/schema", render_plugins=render_plugins(REQUEST_BODIES)
        ),
        request_max_body_size=max_request_bytes,
        # The node configures logging once, one format for every logger; Litestar's default config
        # would replace the root handler and its level.
        logging_config=None,
    )


def _require_api_key(api_key: str, *, metrics_public: bool = False) -> Any:
    expected = api_key.encode()

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if handler.opt.get("public") or (metrics_public and handler.opt.get("metrics")):
            return
        supplied = _supplied_key(connection)
        if supplied is None or not hmac.compare_digest(supplied.encode(), expected):
            raise NotAuthorizedException(
                "missing or invalid API key: send it as 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return guard


def _supplied_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    authorization = connection.headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    # Anthropic's SDK sends the key this way.
    return connection.headers.get("x-api-key")


def _model_object(model: ModelInfo) -> ModelObject:
    return ModelObject(
        id=model.model_id,
        object="model",
        created=0,
        owned_by="exo",
        n_layers=model.n_layers,
        bytes=model.total_weight_bytes,
        architecture=model.architecture,
        supported=model.supported,
        reason=model.reason,
        context_length=context_length(model),
    )


def _event_document(indexed: IndexedEvent) -> IndexedEventDocument:
    return IndexedEventDocument(
        indexed.index, indexed.term, indexed.origin_node_id, indexed.origin_sequence, indexed.event
    )
