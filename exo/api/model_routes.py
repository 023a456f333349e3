"""Model management over HTTP: fetch a Hub model to the cluster, delete it, see each node's state.

`GET /models` lists every model this node has or the cluster knows of, with its state on each
node (`downloading` with bytes, `ready`, `failed` with the reason); `POST /models/download`
answers 202 and the nodes fetch in the background; `DELETE /models/{id}` removes the files from
every node (409 while an instance uses them); `POST /ollama/api/pull` streams progress in
Ollama's own shape. The figures are live (never in the event log).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Protocol

import msgspec
from litestar import Request, Response, delete, post
from litestar import get as get_route
from litestar.params import JSONBody, Parameter
from litestar.response import Stream

from exo.api.cluster_port import NodeServices, ServiceError
from exo.api.completion_routes import ndjson_stream
from exo.api.errors import BODY, QUERY, READ, decode_strictly, error_responses
from exo.api.model_limits import context_length
from exo.api.ollama import model_id as ollama_model_id
from exo.core.models import ModelInfo

PULL_POLL_SECONDS = 0.25
PULL_TIMEOUT_SECONDS = 24 * 3600.0


class NodeModelState(msgspec.Struct, frozen=True):
    """One node's state of one model: `downloading` (bytes so far), `ready`, `failed` (reason),
    `requested` (asked, not begun), `removing`."""

    status: str
    bytes_done: int = 0
    bytes_total: int = 0
    reason: str | None = None


class ModelServices(Protocol):
    """What the model routes need from the node (the node implements it over its fetcher)."""

    def model_states(self) -> dict[str, dict[str, NodeModelState]]:
        """Model id -> node id -> state, for every model the log or a live figure knows of."""
        ...

    async def download_model(self, model_id: str, node_ids: list[str] | None) -> list[str]:
        """Ask nodes to fetch the whole model (default: the nodes a placement would use);
        returns their ids. Raises ModelNotFound, ModelUnavailable (the Hub refused: gated, absent,
        unreachable), ClusterUnavailable."""
        ...

    async def delete_model(self, model_id: str) -> list[str]:
        """Remove the model's files from every node; returns the nodes asked. Raises
        ModelUnavailable (409) while an instance uses the model."""
        ...


class ClusterModel(msgspec.Struct, frozen=True):
    id: str
    object: str
    created: int
    owned_by: str
    n_layers: int
    bytes: int
    architecture: str
    supported: bool
    reason: str
    context_length: int | None
    local: bool  # whether this node's models dir has it (all its files)
    nodes: dict[str, NodeModelState]


class ClusterModelList(msgspec.Struct, frozen=True):
    object: str
    data: list[ClusterModel]


class DownloadRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    node_ids: Annotated[list[str], msgspec.Meta(min_length=1, max_length=1024)] | None = None


class DownloadAccepted(msgspec.Struct, frozen=True):
    model_id: str
    node_ids: list[str]
    status: str = "downloading"


class DeletedModel(msgspec.Struct, frozen=True):
    model_id: str
    node_ids: list[str]
    deleted: bool = True


class PullRequest(msgspec.Struct, frozen=True, kw_only=True):
    # Ollama's clients send `model` (older ones `name`), `insecure`, `stream`.
    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool = False


class PullStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


ModelIdPath = Annotated[str, Parameter(min_length=1, max_length=256)]


def _cluster_model(model: ModelInfo | None, model_id: str, nodes: dict[str, NodeModelState]) -> ClusterModel:
    if model is None:
        total = max((state.bytes_total for state in nodes.values()), default=0)
        return ClusterModel(
            model_id, "model", 0, "exo", 0, total, "unknown", True, "", None, local=False, nodes=nodes
        )
    return ClusterModel(
        id=model.model_id, object="model", created=0, owned_by="exo", n_layers=model.n_layers,
        bytes=model.total_weight_bytes, architecture=model.architecture, supported=model.supported,
        reason=model.reason, context_length=context_length(model), local=True, nodes=nodes,
    )  # fmt: skip


def _model_services(services: Any) -> ModelServices:
    return services  # the node's services implement both protocols


@get_route("/models", responses=error_responses(*READ))
async def cluster_models(services: Any) -> ClusterModelList:
    """Every model here or known to the cluster, with its state on each node."""
    node_services: NodeServices = services
    states = _model_services(services).model_states()
    local = {model.model_id: model for model in node_services.models()}
    ids = sorted(set(local) | set(states))
    return ClusterModelList(
        "list", [_cluster_model(local.get(each), each, states.get(each, {})) for each in ids]
    )


@post("/models/download", status_code=202, responses=error_responses(*BODY, 403, 404, 503, 507))
async def download_model(
    services: Any, request: Request[Any, Any, Any], data: JSONBody[DownloadRequest]
) -> DownloadAccepted:
    body = await decode_strictly(request, DownloadRequest)
    node_ids = await _model_services(services).download_model(body.model_id, body.node_ids)
    return DownloadAccepted(body.model_id, node_ids)


@delete("/models/{model_id:path}", status_code=200, responses=error_responses(*QUERY, 404, 409, 503))
async def delete_model(services: Any, model_id: ModelIdPath) -> DeletedModel:
    model_id = model_id.lstrip("/")
    node_ids = await _model_services(services).delete_model(model_id)
    return DeletedModel(model_id, node_ids)


@post("/ollama/api/pull", status_code=200, responses=error_responses(*BODY, 404, dialect="ollama"))
async def ollama_pull(
    services: Any, request: Request[Any, Any, Any], data: JSONBody[PullRequest]
) -> Response[Any] | Stream:
    """Fetch a model to this node, streaming Ollama's progress lines (status, digest, total,
    completed), ending with `{"status": "success"}` or `{"error": ...}`."""
    body = await decode_strictly(request, PullRequest)
    model_id = ollama_model_id(body.model or body.name or "")
    node_services: NodeServices = services
    model_services = _model_services(services)
    await model_services.download_model(model_id, [node_services.node_id])
    lines = _pull_lines(model_services, model_id, node_services.node_id)
    if body.stream:
        return ndjson_stream(lines)
    last = b""
    async for line in lines:
        last = line
    return Response(last, media_type="application/json")


async def _pull_lines(services: ModelServices, model_id: str, node_id: str) -> AsyncGenerator[bytes, None]:
    yield msgspec.json.encode(PullStatus("pulling manifest")) + b"\n"
    deadline = time.monotonic() + PULL_TIMEOUT_SECONDS
    last: PullStatus | None = None
    repo_id = model_id.split("@", 1)[0]
    while time.monotonic() < deadline:
        try:
            state = services.model_states().get(repo_id, {}).get(node_id)
        except ServiceError as error:
            yield msgspec.json.encode({"error": str(error)}) + b"\n"
            return
        if state is not None and state.status == "failed":
            yield msgspec.json.encode({"error": state.reason or "download failed"}) + b"\n"
            return
        if state is not None and state.status in ("downloading", "ready"):
            line = PullStatus(f"pulling {repo_id}", f"sha256:{repo_id}", state.bytes_total, state.bytes_done)
            if line != last:
                last = line
                yield msgspec.json.encode(line) + b"\n"
            if state.status == "ready":
                for status in ("verifying sha256 digest", "writing manifest", "success"):
                    yield msgspec.json.encode(PullStatus(status)) + b"\n"
                return
        await asyncio.sleep(PULL_POLL_SECONDS)
    yield msgspec.json.encode({"error": f"{model_id}: no progress within the pull's time limit"}) + b"\n"


MODEL_ROUTES = [cluster_models, download_model, delete_model, ollama_pull]
REQUEST_BODIES: dict[tuple[str, str], type[Any]] = {
    ("post", "/models/download"): DownloadRequest,
    ("post", "/ollama/api/pull"): PullRequest,
}
