"""Claude's /v1/messages/count_tokens and the embedding routes (501 not_supported) over a fake node."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from exo.api.app import create_app
from tests.harness.api_checks import assert_claude_error
from tests.harness.fakes import FakeNodeServices, FakeTokenizer

HEADERS = {"anthropic-version": "2023-06-01"}
TOOL = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
MESSAGES = [
    {"role": "user", "content": "weather in Paris?"},
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}],
    },
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]},
]


@pytest.fixture
def services() -> FakeNodeServices:
    fake = FakeNodeServices()
    fake.tokenizers["exo-tiny"] = FakeTokenizer()
    fake.script = [ord(character) for character in "ok"]
    return fake


@pytest.fixture
def client(services: FakeNodeServices) -> Iterator[TestClient[Any]]:
    with TestClient(create_app(services)) as test_client:
        yield test_client


def count(client: TestClient[Any], headers: dict[str, str] | None = None, **body: Any) -> Any:
    return client.post(
        "/v1/messages/count_tokens",
        json={"model": "exo-tiny", "messages": MESSAGES, **body},
        headers=HEADERS if headers is None else headers,
    )


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"system": "Be brief."},
        {"tools": [TOOL]},
        {"system": [{"type": "text", "text": "S"}], "tools": [TOOL]},
    ],
)
def test_count_equals_the_messages_routes_input_tokens(
    client: TestClient[Any], services: FakeNodeServices, extra: dict[str, Any]
) -> None:
    counted = count(client, **extra)
    assert counted.status_code == 200, counted.text
    answer = client.post(
        "/v1/messages",
        json={"model": "exo-tiny", "messages": MESSAGES, "max_tokens": 8, **extra},
        headers=HEADERS,
    ).json()
    assert counted.json() == {"input_tokens": answer["usage"]["input_tokens"]}
    assert counted.json()["input_tokens"] == len(services.generate_calls[-1].prompt_tokens)


def test_count_grows_with_tools_and_system(client: TestClient[Any]) -> None:
    plain = count(client).json()["input_tokens"]
    assert count(client, system="Be brief.").json()["input_tokens"] == plain + len("<system>Be brief.")
    assert count(client, tools=[TOOL]).json()["input_tokens"] > plain


def test_count_tokens_errors_are_claude_shaped(client: TestClient[Any], services: FakeNodeServices) -> None:
    assert_claude_error(count(client, headers={}), 400, "invalid_request_error")
    assert_claude_error(count(client, model="nope"), 404, "not_found_error")
    assert_claude_error(count(client, messages=[]), 400, "invalid_request_error")
    assert_claude_error(
        count(client, messages=[{"role": "robot", "content": "x"}]), 400, "invalid_request_error"
    )
    assert_claude_error(count(client, tool_choice={"type": "sometimes"}), 400, "invalid_request_error")
    services.tokenizers["exo-tiny"].renders_tools = False
    message = assert_claude_error(count(client, tools=[TOOL]), 400, "invalid_request_error")
    assert "does not render tools" in message
    assert services.generate_calls == []  # counting never generates


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"model": "exo-tiny", "input": "hi"}),
        ("/v1/embeddings", None),
        ("/ollama/api/embed", {"model": "exo-tiny", "input": ["a", "b"]}),
        ("/ollama/api/embeddings", {"model": "exo-tiny", "prompt": "hi"}),
    ],
)
def test_embeddings_answer_501_not_supported(client: TestClient[Any], path: str, body: Any) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 501, response.text
    payload = response.json()
    if path.startswith("/ollama"):
        assert payload["code"] == "not_supported" and "not supported" in payload["error"]
    else:
        assert payload["error"]["code"] == "not_supported" and payload["error"]["param"] is None
        assert "not supported" in payload["error"]["message"]
