"""Helpers the Responses API tests share: a function tool, a create call, the typed SSE events."""

from __future__ import annotations

import json
from typing import Any

from litestar.testing import TestClient

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def create(client: TestClient[Any], **body: Any) -> Any:
    return client.post("/v1/responses", json={"model": "exo-tiny", "input": "hi", **body})


def stream_events(response: Any) -> list[dict[str, Any]]:
    """Each SSE block is `event: <type>` then `data: <json>`, and the two types agree."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events: list[dict[str, Any]] = []
    for block in response.text.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        payload = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {payload['type']}"
        events.append(payload)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events
