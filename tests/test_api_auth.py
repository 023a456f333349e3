"""--api-key: every route but GET /health needs the bearer token."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from exo.api.app import create_app
from tests.harness.api_checks import assert_error, build_state
from tests.harness.fakes import FakeNodeServices

API_KEY = "s3cret-key"
CHAT_BODY = {"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}]}

# (method, path, JSON body, status when authorized)
ROUTES: list[tuple[str, str, Any, int]] = [
    ("GET", "/node_id", None, 200),
    ("GET", "/node_status", None, 200),
    ("GET", "/state", None, 200),
    ("GET", "/events?since=0", None, 200),
    ("GET", "/models", None, 200),
    ("GET", "/v1/models", None, 200),
    ("POST", "/place_instance", {"model_id": "exo-tiny"}, 200),
    ("GET", "/instance/previews?model_id=exo-tiny", None, 200),
    ("GET", "/instance/i-7", None, 200),
    ("DELETE", "/instance/i-7", None, 200),
    ("DELETE", "/node/node1", None, 200),
    ("POST", "/v1/chat/completions", CHAT_BODY, 200),
    ("POST", "/v1/chat/completions", {**CHAT_BODY, "stream": True}, 200),
    ("GET", "/v1/models/exo-tiny", None, 200),
    ("POST", "/v1/completions", {"model": "exo-tiny", "prompt": "hi"}, 200),
    ("POST", "/v1/cancel/chatcmpl-none", None, 404),  # nothing in progress
    ("POST", "/v1/messages", {**CHAT_BODY, "max_tokens": 8}, 200),
    ("GET", "/ollama", None, 200),
    ("GET", "/ollama/api/version", None, 200),
    ("GET", "/ollama/api/tags", None, 200),
    ("GET", "/ollama/api/ps", None, 200),
    ("POST", "/ollama/api/show", {"model": "exo-tiny"}, 200),
    ("POST", "/ollama/api/chat", {**CHAT_BODY, "stream": False}, 200),
    ("POST", "/ollama/api/generate", {"model": "exo-tiny", "prompt": "hi"}, 200),
    ("POST", "/v1/responses", {"model": "exo-tiny", "input": "hi"}, 200),
    ("GET", "/v1/responses/resp_none", None, 404),
    ("DELETE", "/v1/responses/resp_none", None, 404),
    ("POST", "/v1/responses/resp_none/cancel", None, 404),
    ("GET", "/v1/responses/resp_none/input_items", None, 404),
    ("POST", "/v1/messages/count_tokens", {"model": "exo-tiny", "messages": CHAT_BODY["messages"]}, 200),
    ("POST", "/v1/embeddings", {"model": "exo-tiny", "input": "hi"}, 501),
    ("POST", "/ollama/api/embed", {"model": "exo-tiny", "input": "hi"}, 501),
    ("POST", "/ollama/api/embeddings", {"model": "exo-tiny", "prompt": "hi"}, 501),
    ("GET", "/schema/openapi.json", None, 200),
    ("GET", "/metrics", None, 200),
    ("GET", "/v1/traces", None, 200),
    ("GET", "/v1/traces/chatcmpl-none", None, 404),  # no such request
]
# Concrete paths in ROUTES -> the templated paths of the schema.
PATH_TEMPLATES = {
    "traces/chatcmpl-none": "traces/{request_id}",
    "i-7": "{instance_id}",
    "/node/node1": "/node/{node_id}",
    "models/exo-tiny": "models/{model_id}",
    "chatcmpl-none": "{completion_id}",
    "resp_none": "{response_id}",
}


@pytest.fixture
def client() -> Iterator[TestClient[Any]]:
    state, indexed_events = build_state()
    services = FakeNodeServices(state=state)
    services.indexed_events = indexed_events
    services.script = [ord("o"), ord("k")]
    with TestClient(create_app(services, api_key=API_KEY)) as test_client:
        yield test_client


def call(client: TestClient[Any], method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    # Claude's route needs its version header; the others ignore it.
    return client.request(method, path, json=body, headers={"anthropic-version": "2023-06-01", **headers})


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"Authorization": "Bearer "},
        {"x-api-key": "wrong-key"},
    ],
    ids=["none", "wrong", "not-bearer", "longer", "empty", "wrong-x-api-key"],
)
def test_without_the_key_every_route_is_401(client: TestClient[Any], headers: dict[str, str]) -> None:
    for method, path, body, _ in ROUTES:
        response = call(client, method, path, body, headers)
        message = auth_error_message(response, path)
        assert "API key" in message, (method, path)
        assert response.headers["www-authenticate"] == "Bearer", (method, path)


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {API_KEY}"}, {"authorization": f"bearer {API_KEY}"}, {"x-api-key": API_KEY}],
    ids=["bearer", "lowercase", "x-api-key"],
)
def test_with_the_key_every_route_answers(client: TestClient[Any], headers: dict[str, str]) -> None:
    answers = {
        (method, path): call(client, method, path, body, headers).status_code
        for method, path, body, _ in ROUTES
    }
    assert answers == {(method, path): status_code for method, path, _, status_code in ROUTES}


def test_health_needs_no_key(client: TestClient[Any]) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 200


def test_cors_preflight_needs_no_key(client: TestClient[Any]) -> None:
    """Browsers send preflights without credentials; the real request still needs the key."""
    response = client.options(
        "/v1/chat/completions",
        headers={"Origin": "http://dashboard.local", "Access-Control-Request-Method": "POST"},
    )
    assert response.status_code == 204


def test_every_route_is_in_the_table(client: TestClient[Any]) -> None:
    """A new route must be added to ROUTES, so the auth table keeps covering everything."""
    schema = client.get("/schema/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    documented = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    covered = {(method, templated(path.split("?")[0])) for method, path, _, _ in ROUTES}
    assert documented - {("GET", "/health")} <= covered


def templated(path: str) -> str:
    for concrete, template in PATH_TEMPLATES.items():
        path = path.replace(concrete, template)
    return path


def auth_error_message(response: Any, path: str) -> str:
    """A 401 in the route's dialect: Anthropic's shape on /v1/messages, Ollama's under /ollama."""
    if path.startswith("/v1/messages"):
        assert response.status_code == 401
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        return str(body["error"]["message"])
    if path.startswith("/ollama/"):
        assert response.status_code == 401
        return str(response.json()["error"])
    return assert_error(response, 401, "invalid_api_key")
