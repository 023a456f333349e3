"""Bodies that are not a JSON request: empty, another media type, a turn without its content."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

from tests.harness.fakes import FakeNodeServices

CLAUDE_HEADERS = {"anthropic-version": "2023-06-01"}
BODY_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/ollama/api/chat",
    "/ollama/api/generate",
    "/place_instance",
]


def error_message(path: str, body: Any) -> str:
    """The message of the route's own error shape (OpenAI, Anthropic or Ollama)."""
    if path.startswith("/ollama/"):
        return body["error"]
    return body["error"]["message"]


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("content", [b"", b"  \n"])
def test_an_empty_body_is_named_as_such(
    client: TestClient[Any], services: FakeNodeServices, path: str, content: bytes
) -> None:
    response = client.post(
        path, content=content, headers={**CLAUDE_HEADERS, "content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert error_message(path, response.json()) == "invalid request: body is empty"
    assert services.generate_calls == []


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize(
    "media_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_body_that_is_not_json_is_415(
    client: TestClient[Any], services: FakeNodeServices, path: str, media_type: str
) -> None:
    body = b'{"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}'
    response = client.post(path, content=body, headers={**CLAUDE_HEADERS, "content-type": media_type})
    assert response.status_code == 415, response.text
    message = error_message(path, response.json())
    assert media_type in message and "application/json" in message
    if not path.startswith(("/ollama/", "/v1/messages")):
        assert response.json()["error"]["code"] == "unsupported_media_type"
    assert services.generate_calls == []


@pytest.mark.parametrize("media_type", ["application/json", "application/json; charset=utf-8", None])
def test_json_bodies_with_or_without_a_content_type_are_taken(
    client: TestClient[Any], media_type: str | None
) -> None:
    body = b'{"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    headers = {} if media_type is None else {"content-type": media_type}
    response = client.post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("messages", "param", "says"),
    [
        ([{"role": "user"}], "messages[0].content", "a 'user' message needs a 'content'"),
        ([{"role": "system"}, {"role": "user", "content": "hi"}], "messages[0].content", "'system'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c"}],
            "messages[1].content",
            "'tool'",
        ),
        ([{"role": "user", "content": None}], "messages[0].content", "needs a 'content'"),
    ],
)
def test_a_turn_without_the_content_its_role_requires_is_400(
    client: TestClient[Any], services: FakeNodeServices, messages: list[dict[str, Any]], param: str, says: str
) -> None:
    response = client.post("/v1/chat/completions", json={"model": "exo-tiny", "messages": messages})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert says in error["message"]
    assert services.generate_calls == []


@pytest.mark.parametrize("assistant", [{"tool_calls": "call"}, {"content": None}, {}])
def test_an_assistant_turn_needs_no_content(client: TestClient[Any], assistant: dict[str, Any]) -> None:
    """Only tool calls, or a null placeholder: clients send both, and OpenAI takes the first."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turn = {
        "role": "assistant",
        **{key: [call] if value == "call" else value for key, value in assistant.items()},
    }
    messages = [
        {"role": "user", "content": "hi"},
        turn,
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    response = client.post("/v1/chat/completions", json={"model": "exo-tiny", "messages": messages})
    assert response.status_code == 200, response.text
