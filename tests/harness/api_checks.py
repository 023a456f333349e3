"""Shared checks of the HTTP API's answers, and the small cluster the route tests serve."""

from __future__ import annotations

import json
import time
from typing import Any

from exo.core.events import (
    IndexedEvent,
    InstanceCreated,
    MasterElected,
    NodeJoined,
    ShardAssignment,
)
from exo.core.state import State, apply
from tests.harness.fakes import FakeNodeServices, FakeTokenizer, GenerateCall

# Multi-character tokens so tests can split text across tokens where they like.
HELLO_VOCABULARY = {1000: "Hel", 1001: "lo", 1002: " wo", 1003: "rld", 1004: "!"}
HELLO_SCRIPT: list[int] = [1000, 1001, 1002, 1003, 1004]  # "Hello world!"


def say_hello_world(fake: FakeNodeServices) -> FakeNodeServices:
    """Script `fake` so the next generation says "Hello world!" in five tokens."""
    fake.tokenizers["exo-tiny"] = FakeTokenizer(dict(HELLO_VOCABULARY))
    fake.script = list(HELLO_SCRIPT)
    return fake


def build_state() -> tuple[State, list[IndexedEvent]]:
    """Two nodes and one ready-to-load instance, with the log that made them."""
    events = [
        MasterElected(term=1, node_id="node0"),
        NodeJoined(node_id="node0", bus_address="tcp://10.0.0.1:52414", memory_available_bytes=6000),
        NodeJoined(node_id="node1", bus_address="tcp://10.0.0.2:52414", memory_available_bytes=3000),
        InstanceCreated(
            instance_id="i-7",
            model_id="exo-tiny",
            sharding="Pipeline",
            shard_assignments={"node0": ShardAssignment(0, 8, 8)},
        ),
    ]
    state = State()
    indexed_events: list[IndexedEvent] = []
    for index, event in enumerate(events, start=1):
        indexed = IndexedEvent(
            index=index, term=1, origin_node_id="node0", origin_sequence=index, event=event
        )
        indexed_events.append(indexed)
        state = apply(state, indexed)
    return state, indexed_events


def assert_error(response: Any, status_code: int, code: str | None = None, param: str | None = None) -> str:
    """The response is OpenAI's error object with this status; returns the message."""
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    expected_type = "invalid_request_error" if status_code < 500 else "server_error"
    assert body["error"]["type"] == expected_type
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]["message"]


def sse_events(response: Any) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" kept as a string)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("\n\n")
    events: list[Any] = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def streamed_text(events: list[Any]) -> str:
    return "".join(
        event["choices"][0]["delta"].get("content") or ""
        for event in events
        if isinstance(event, dict) and event.get("choices")
    )


def wait_until_generation_ends(call: GenerateCall, timeout: float = 5.0) -> None:
    """The response can be complete a moment before the app's task closes the generation."""
    deadline = time.monotonic() + timeout
    while not (call.finished or call.closed_early):
        assert time.monotonic() < deadline, "the generation neither finished nor was closed"
        time.sleep(0.005)


def assert_claude_error(response: Any, status_code: int, error_type: str) -> str:
    assert response.status_code == status_code, response.text
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    return str(body["error"]["message"])
