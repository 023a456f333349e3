"""The dashboard's server side over the fake node: the page and assets, the live feed's frames,
/metrics (per-app registry, the API key, --metrics-public) and per-request traces."""

from __future__ import annotations

import json
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from exo.api.app import create_app
from exo.api.dashboard_routes import _frames  # pyright: ignore[reportPrivateUsage]
from exo.api.live_feed import CLIENT_QUEUE_BATCHES, MAX_CLIENTS, FeedClosed, LiveFeed
from exo.api.telemetry import Telemetry
from exo.api.traces import Trace, TraceStore
from exo.core.events import IndexedEvent, MasterElected, NodeJoined
from tests.harness.api_checks import HELLO_SCRIPT, build_state, say_hello_world
from tests.harness.fakes import FakeNodeServices

API_KEY = "k3y"
STREAMED = len(HELLO_SCRIPT) + 1  # and the end-of-sequence token, which is generated but not shown
CHAT = {"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_page_and_its_assets_are_served_without_a_key() -> None:
    with TestClient(create_app(FakeNodeServices(), api_key=API_KEY)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/dashboard/app.js">' in page.text
        for name, media in [
            ("app.js", "text/javascript"),
            ("api.js", "text/javascript"),
            ("style.css", "text/css"),
        ]:
            asset = client.get(f"/dashboard/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(media), name
        # The data behind it is not public.
        assert client.get("/v1/dashboard/stream").status_code == 401
        assert client.get("/state").status_code == 401


@pytest.mark.parametrize("name", ["nope.js", "app.py", "..%2Fapp.py", "APP.JS", "dashboard"])
def test_an_unknown_asset_is_404(name: str) -> None:
    with TestClient(create_app(FakeNodeServices())) as client:
        assert client.get(f"/dashboard/{name}").status_code == 404


def test_metrics_need_the_key_unless_public() -> None:
    with TestClient(create_app(FakeNodeServices(), api_key=API_KEY)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    with TestClient(create_app(FakeNodeServices(), api_key=API_KEY, metrics_public=True)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/state").status_code == 401  # only /metrics opened


def test_metrics_count_requests_tokens_and_latencies() -> None:
    state, _ = build_state()
    fake = say_hello_world(FakeNodeServices(state=state))
    fake.status = {
        "last_event_index": 7,
        "durable_event_index": 6,
        "term": 3,
        "is_master": True,
        "dropped_frames": {"decode": 2},
        "queue_depths": {"apply": 1},
        "links": {"node1": {"rtt_ms": 0.5, "bandwidth_bytes_per_s": 1e9}},
        "runners": {"i-1": {"stats": {"batched_steps": 4, "batched_rows": 10, "largest_batch": 3,
                                       "tokens_sampled": 9, "waiting_requests": 2, "active_requests": 1}}},
        "downloads": {"org/model": {"bytes_done": 10, "bytes_total": 40}},
    }  # fmt: skip
    with TestClient(create_app(fake)) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.get("/instance/i-404").status_code == 404
        values = samples(client.get("/metrics").text)
    assert (
        values[
            (
                "exo_http_requests_total",
                (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200")),
            )
        ]
        == 1
    )
    assert (
        values[
            (
                "exo_http_requests_total",
                (("method", "GET"), ("route", "/instance/{instance_id}"), ("status", "404")),
            )
        ]
        == 1
    )
    assert values[("exo_tokens_generated_total", ())] == STREAMED
    assert values[("exo_time_to_first_token_seconds_count", ())] == 1
    assert values[("exo_inter_token_latency_seconds_count", ())] == STREAMED - 1
    assert values[("exo_log_index", ())] == 7
    assert values[("exo_log_durable_index", ())] == 6
    assert values[("exo_is_master", ())] == 1
    assert values[("exo_bus_frames_dropped_total", (("reason", "decode"),))] == 2
    assert values[("exo_queue_depth", (("queue", "runner_waiting:i-1"),))] == 2
    assert values[("exo_batch_size_mean", (("instance", "i-1"),))] == 2.5
    assert values[("exo_link_latency_seconds", (("peer", "node1"),))] == 0.0005
    assert values[("exo_link_bandwidth_bytes_per_second", (("peer", "node1"),))] == 1e9
    assert values[("exo_download_bytes", (("model", "org/model"),))] == 10


def test_two_apps_in_one_process_keep_their_own_registries() -> None:
    with (
        TestClient(create_app(say_hello_world(FakeNodeServices()))) as first,
        TestClient(create_app(FakeNodeServices())) as second,
    ):
        first.post("/v1/chat/completions", json=CHAT)
        assert samples(first.get("/metrics").text)[("exo_tokens_generated_total", ())] == STREAMED
        assert samples(second.get("/metrics").text)[("exo_tokens_generated_total", ())] == 0


def test_a_completion_leaves_a_trace() -> None:
    state, _ = build_state()
    with TestClient(create_app(say_hello_world(FakeNodeServices(state=state)))) as client:
        completion_id = client.post("/v1/chat/completions", json=CHAT).json()["id"]
        trace = client.get(f"/v1/traces/{completion_id}").json()
        assert client.get("/v1/traces").json()["request_ids"] == [completion_id]
        missing = client.get("/v1/traces/chatcmpl-unknown")
        bad = client.get("/v1/traces/not%20an%20id")
    assert (
        trace["request_id"] == completion_id and trace["completion_tokens"] == 5
    )  # the end-of-sequence token is not counted
    names = [span["name"] for span in trace["spans"]]
    assert names[0] == "prepare" and "queue + prefill" in names and names[-1] == "decode"
    assert all(span["start_ms"] >= 0 and span["duration_ms"] >= 0 for span in trace["spans"])
    assert trace["ttft_ms"] is not None and set(trace["inter_token_ms"]) == {"mean", "p50", "p95", "max"}
    assert missing.status_code == 404 and "only the last 512" in missing.json()["error"]["message"]
    assert bad.status_code == 400


def test_the_trace_store_keeps_the_newest() -> None:
    store = TraceStore(capacity=3)
    for number in range(5):
        store.add(Trace(request_id=f"r{number}", model="m", instance_id="i", prompt_tokens=1,
                        completion_tokens=1, cached_tokens=None, total_ms=1, ttft_ms=1,
                        tokens_per_second=None, inter_token_ms={}, spans=[]))  # fmt: skip
    assert store.recent() == ["r4", "r3", "r2"] and store.get("r0") is None


def frame(raw: bytes) -> tuple[str, Any]:
    head, data = raw.decode().rstrip("\n").split("\n", 1)
    assert head.startswith("event: ") and data.startswith("data: ")
    return head[7:], json.loads(data[6:])


async def test_the_feed_sends_a_snapshot_then_events_as_applied() -> None:
    state, indexed_events = build_state()
    fake = FakeNodeServices(state=state)
    fake.indexed_events = indexed_events
    feed = LiveFeed()
    client = feed.join()
    frames = _frames(fake, feed, client, Telemetry(fake.node_status, feed))
    kind, snapshot = frame(await anext(frames))
    assert kind == "snapshot" and snapshot["node_id"] == "node0"
    assert snapshot["state"]["master_node_id"] == "node0"
    assert [event["index"] for event in snapshot["events"]] == [event.index for event in indexed_events]
    joined = IndexedEvent(
        len(indexed_events) + 1, 1, "node0", 9, NodeJoined(node_id="node2", bus_address="x")
    )
    feed.publish([joined])
    kind, update = frame(await anext(frames))
    assert kind == "events" and update["events"][0]["event"]["type"] == "NodeJoined"
    assert feed.events_applied == 1
    await frames.aclose()
    assert len(feed) == 0  # the client left with its stream


async def test_a_page_that_falls_behind_gets_the_whole_state_again() -> None:
    state, _ = build_state()
    fake = FakeNodeServices(state=state)
    feed = LiveFeed()
    client = feed.join()
    frames = _frames(fake, feed, client, Telemetry(fake.node_status, feed))
    await anext(frames)
    for index in range(CLIENT_QUEUE_BATCHES + 5):  # the page reads nothing meanwhile
        feed.publish([IndexedEvent(100 + index, 2, "node0", index, MasterElected(term=2, node_id="node0"))])
    assert client.behind
    kind, _ = frame(await anext(frames))
    assert kind == "snapshot" and not client.behind
    assert feed.elections == CLIENT_QUEUE_BATCHES + 5
    await frames.aclose()


def test_the_feed_refuses_more_than_its_clients() -> None:
    feed = LiveFeed()
    for _ in range(MAX_CLIENTS):
        feed.join()
    with pytest.raises(FeedClosed, match="too many open dashboards"):
        feed.join()


def test_every_dashboard_file_ships_as_package_data() -> None:
    """A non-editable install carries only what pyproject's package-data names."""
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "exo.api"
    ]
    files = sorted(
        path.relative_to(root / "exo" / "api") for path in (root / "exo" / "api" / "dashboard").iterdir()
    )
    assert files and all(any(fnmatch(str(path), pattern) for pattern in globs) for path in files), (
        files,
        globs,
    )
