"""The dashboard's routes: the page and its assets at `GET /`, its live feed, `/metrics`, traces.

The page is plain HTML, CSS and ES modules shipped in the package (exo/api/dashboard/): no
JavaScript toolchain anywhere. The page and its assets are public (they hold no data); everything
they load asks for the API key like any other route. The feed is server-sent events read with
`fetch()` streaming rather than `EventSource`, because EventSource cannot send an Authorization
header and a key in the URL would end up in logs and history.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Sequence
from importlib import resources
from typing import Annotated, Any, Final

import msgspec
from litestar import Response, get
from litestar.params import Parameter, SkipValidation
from litestar.response import Stream

from exo.api.cluster_port import NodeServices, ServiceError
from exo.api.errors import QUERY, READ, ApiError, error_responses
from exo.api.live_feed import FeedClient, FeedClosed, LiveFeed
from exo.api.telemetry import Telemetry
from exo.api.traces import Trace
from exo.core.events import IndexedEvent
from exo.core.state import state_document

PUBLIC: Final = {"public": True}
STATUS_SECONDS: Final = 1.0  # node_status (links, runners, downloads) at most this often
TAIL_EVENTS: Final = 50  # the log's tail sent with the first frame
ASSET_NAME = re.compile(r"^[a-z0-9_-]+\.(js|css|html|svg)$")
MEDIA_TYPES: Final = {
    "js": "text/javascript",
    "css": "text/css",
    "html": "text/html",
    "svg": "image/svg+xml",
}
SSE_HEADERS: Final = {"cache-control": "no-cache", "x-accel-buffering": "no"}

Services = SkipValidation[NodeServices]
Feed = SkipValidation[LiveFeed]
Metrics = SkipValidation[Telemetry]
AssetName = Annotated[str, Parameter(max_length=64)]
RequestId = Annotated[str, Parameter(pattern=r"^[A-Za-z0-9_-]+$", max_length=128)]


class TraceList(msgspec.Struct, frozen=True):
    request_ids: list[str]


def _asset(name: str) -> bytes:
    return (resources.files("exo.api") / "dashboard" / name).read_bytes()


@get("/", opt=PUBLIC, include_in_schema=False)
async def dashboard_page() -> Response[bytes]:
    """The dashboard (docs/dashboard.md)."""
    return Response(_asset("index.html"), media_type="text/html", headers={"cache-control": "no-cache"})


@get("/dashboard/{name:str}", opt=PUBLIC, include_in_schema=False)
async def dashboard_asset(name: AssetName) -> Response[bytes]:
    if not ASSET_NAME.match(name):
        raise ApiError(404, f"no dashboard asset {name!r}", code="not_found")
    try:
        body = _asset(name)
    except (FileNotFoundError, IsADirectoryError):
        raise ApiError(404, f"no dashboard asset {name!r}", code="not_found") from None
    media_type = MEDIA_TYPES[name.rsplit(".", 1)[1]]
    return Response(body, media_type=media_type, headers={"cache-control": "no-cache"})


@get("/v1/dashboard/stream", include_in_schema=False)
async def dashboard_stream(services: Services, feed: Feed, telemetry: Metrics) -> Stream:
    """Server-sent events: `snapshot` (the state, the node's status, the log's tail) first and
    whenever this page fell behind, `events` (applied events and the state after them) as they
    are applied, `status` (this node's runtime figures) every second."""
    try:
        client = feed.join()
    except FeedClosed as error:
        raise ApiError(503, str(error), code="overloaded") from None
    return Stream(
        _frames(services, feed, client, telemetry), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _frames(
    services: NodeServices, feed: LiveFeed, client: FeedClient, telemetry: Telemetry
) -> AsyncGenerator[bytes, None]:
    try:
        yield await _snapshot(services, telemetry)
        sent_index = services.state().last_event_index
        status_at = time.monotonic()
        while True:
            wait = max(0.0, status_at + STATUS_SECONDS - time.monotonic())
            try:
                await asyncio.wait_for(client.wakeup.wait(), wait)
            except TimeoutError:
                if services.state().last_event_index != sent_index:
                    # A snapshot installed or a tail dropped: no applied batch told this page.
                    yield await _snapshot(services, telemetry)
                else:
                    yield _sse("status", _status_json(services, telemetry))
                sent_index = services.state().last_event_index
                status_at = time.monotonic()
                continue
            events = client.drain()
            sent_index = services.state().last_event_index
            if client.behind:
                client.behind = False
                yield await _snapshot(services, telemetry)
            elif events:
                state = state_document(services.state())
                yield _sse("events", b'{"events":' + _events_json(events) + b',"state":' + state + b"}")
    finally:
        feed.leave(client)


async def _snapshot(services: NodeServices, telemetry: Telemetry) -> bytes:
    state = services.state()
    since = max(0, state.last_event_index - TAIL_EVENTS)
    try:
        tail = await services.events_since(since, TAIL_EVENTS)
    except ServiceError:
        tail = []
    body = (
        b'{"node_id":' + msgspec.json.encode(services.node_id)
        + b',"state":' + state_document(state)
        + b',"status":' + _status_json(services, telemetry)
        + b',"events":' + _events_json(tail) + b"}"
    )  # fmt: skip
    return _sse("snapshot", body)


def _status_json(services: NodeServices, telemetry: Telemetry) -> bytes:
    status = dict(services.node_status())
    status["recent_traces"] = telemetry.traces.recent(10)
    return msgspec.json.encode(status)


def _events_json(events: Sequence[IndexedEvent]) -> bytes:
    return msgspec.json.encode(
        [
            {
                "index": indexed.index,
                "term": indexed.term,
                "origin_node_id": indexed.origin_node_id,
                "event": indexed.event,
            }
            for indexed in events
        ]
    )


def _sse(event: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


@get("/metrics", opt={"metrics": True}, media_type="text/plain", include_in_schema=False)
async def metrics(telemetry: Metrics) -> Response[bytes]:
    """Prometheus text format (docs/dashboard.md lists the series)."""
    return Response(telemetry.scrape(), media_type="text/plain; version=0.0.4; charset=utf-8")


@get("/v1/traces", responses=error_responses(*READ))
async def recent_traces(telemetry: Metrics) -> TraceList:
    """The request ids with a trace, newest first."""
    return TraceList(telemetry.traces.recent(100))


@get("/v1/traces/{request_id:str}", responses=error_responses(*QUERY, 404))
async def get_trace(telemetry: Metrics, request_id: RequestId) -> Trace:
    """Where one generation's time went (its completion `id`); the last 512 are kept. Asked for
    as the generation ends, it may wait up to a second for its stages' reports."""
    trace = await telemetry.trace(request_id)
    if trace is None:
        raise ApiError(
            404, f"no trace for request {request_id!r} (only the last 512 are kept)", code="not_found"
        )
    return trace


DASHBOARD_ROUTES: Final[list[Any]] = [
    dashboard_page,
    dashboard_asset,
    dashboard_stream,
    metrics,
    recent_traces,
    get_trace,
]
