"""The cluster routes of the HTTP API over a fake node: shapes, the state document, errors."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from exo.api.app import MAX_EVENTS_PAGE, create_app
from exo.api.cluster_port import ClusterUnavailable, NoCapacity
from exo.core.events import ShardAssignment
from exo.core.state import Instance, RunnerInfo, state_document
from tests.harness.api_checks import assert_error, build_state
from tests.harness.fakes import FakeNodeServices, model_info

GIB = 1024**3


@pytest.fixture
def services(services: FakeNodeServices) -> FakeNodeServices:
    """The shared fake, serving a small cluster's state and the log that made it."""
    services.current_state, services.indexed_events = build_state()
    return services


def test_health(client: TestClient[Any]) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_node_id(client: TestClient[Any]) -> None:
    assert client.get("/node_id").json() == "node0"


def test_node_status_is_the_services_figures(client: TestClient[Any], services: FakeNodeServices) -> None:
    assert client.get("/node_status").json() == services.status


def test_state_is_the_state_document_byte_for_byte(
    client: TestClient[Any], services: FakeNodeServices
) -> None:
    response = client.get("/state")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == state_document(services.current_state)
    document = response.json()
    assert document["master_node_id"] == "node0"
    assert document["last_event_index"] == 4
    assert document["instances"]["i-7"]["shard_assignments"]["node0"] == {
        "start_layer": 0,
        "end_layer": 8,
        "n_layers": 8,
    }


def test_events_since(client: TestClient[Any]) -> None:
    everything = client.get("/events").json()
    assert [event["index"] for event in everything] == [1, 2, 3, 4]
    assert everything[0] == {
        "index": 1,
        "term": 1,
        "origin_node_id": "node0",
        "origin_sequence": 1,
        "event": {"type": "MasterElected", "term": 1, "node_id": "node0"},
    }
    assert [event["index"] for event in client.get("/events?since=2").json()] == [3, 4]
    assert [event["index"] for event in client.get("/events?since=1&limit=2").json()] == [2, 3]
    assert client.get("/events?since=99").json() == []


def test_events_page_is_bounded(client: TestClient[Any], services: FakeNodeServices) -> None:
    template = services.indexed_events[0]
    services.indexed_events = [
        msgspec.structs.replace(template, index=index) for index in range(1, MAX_EVENTS_PAGE + 50)
    ]
    assert len(client.get("/events").json()) == MAX_EVENTS_PAGE


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("since=-1", "since"),
        ("since=abc", "since"),
        ("limit=0", "limit"),
        (f"limit={MAX_EVENTS_PAGE + 1}", "limit"),
    ],
)
def test_events_bad_query(client: TestClient[Any], query: str, param: str) -> None:
    assert_error(client.get(f"/events?{query}"), 400, "invalid_request", param)


def test_models_openai_list_shape(client: TestClient[Any], services: FakeNodeServices) -> None:
    services.model_infos = [
        model_info("exo-tiny", [1000] * 8),
        model_info(
            "gemma-x", [5] * 2, architecture="gemma3", supported=False, reason="architecture not supported"
        ),
        model_info("qwen-small", [10**6] * 24, architecture="qwen2"),
    ]
    exo_tiny = {
        "id": "exo-tiny",
        "object": "model",
        "created": 0,
        "owned_by": "exo",
        "n_layers": 8,
        "bytes": 8000,
        "architecture": "llama",
        "supported": True,
        "reason": "",
        "context_length": None,  # the fake models have no config.json
    }
    gemma = {
        **exo_tiny,
        "id": "gemma-x",
        "n_layers": 2,
        "bytes": 10,
        "architecture": "gemma3",
        "supported": False,
        "reason": "architecture not supported",
    }
    qwen = {**exo_tiny, "id": "qwen-small", "n_layers": 24, "bytes": 24 * 10**6, "architecture": "qwen2"}
    assert client.get("/v1/models").json() == {"object": "list", "data": [exo_tiny, qwen]}
    assert client.get("/models").json() == {"object": "list", "data": [exo_tiny, gemma, qwen]}
    assert client.get("/v1/models/qwen-small").json() == qwen
    assert_error(client.get("/v1/models/gemma-x"), 404, "model_not_found", "model")
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found", "model")


def test_place_instance(client: TestClient[Any]) -> None:
    response = client.post(
        "/place_instance", json={"model_id": "exo-tiny", "sharding": "Pipeline", "min_nodes": 1}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["instance_id"] == "i-1"
    assert body["model_id"] == "exo-tiny"
    assert body["sharding"] == "Pipeline"
    assert body["status"] == "placing"
    assert body["shard_assignments"] == {"node0": {"start_layer": 0, "end_layer": 8, "n_layers": 8}}
    assert client.get("/instance/i-1").json() == body


def test_place_instance_defaults_and_ignores_unknown_fields(client: TestClient[Any]) -> None:
    response = client.post("/place_instance", json={"model_id": "exo-tiny", "instance_meta": "MlxRing"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "model_id"),
        ({"model_id": ""}, "model_id"),
        ({"model_id": 3}, "model_id"),
        ({"model_id": "exo-tiny", "sharding": "Tensor"}, "sharding"),
        ({"model_id": "exo-tiny", "min_nodes": 0}, "min_nodes"),
        ({"model_id": "exo-tiny", "min_nodes": "2"}, "min_nodes"),
    ],
)
def test_place_instance_bad_body(client: TestClient[Any], body: dict[str, Any], param: str) -> None:
    message = assert_error(client.post("/place_instance", json=body), 400, "invalid_request", param)
    assert param in message


def test_place_instance_malformed_json(client: TestClient[Any]) -> None:
    assert_error(client.post("/place_instance", content=b'{"model_id": '), 400, "invalid_request")


def test_place_instance_unknown_model(client: TestClient[Any]) -> None:
    message = assert_error(
        client.post("/place_instance", json={"model_id": "nope"}), 404, "model_not_found", "model"
    )
    assert "nope" in message


def test_place_instance_no_capacity(client: TestClient[Any], services: FakeNodeServices) -> None:
    services.place_error = NoCapacity("exo-tiny", ["node1: needs 8.00 KiB, has 2.93 KiB available"])
    message = assert_error(client.post("/place_instance", json={"model_id": "exo-tiny"}), 503, "no_capacity")
    assert "node1: needs 8.00 KiB, has 2.93 KiB available" in message


def test_place_instance_without_a_master(client: TestClient[Any], services: FakeNodeServices) -> None:
    services.place_error = ClusterUnavailable("election in progress")
    message = assert_error(
        client.post("/place_instance", json={"model_id": "exo-tiny"}), 503, "cluster_unavailable"
    )
    assert "election in progress" in message


def test_previews(client: TestClient[Any]) -> None:
    body = client.get("/instance/previews?model_id=exo-tiny").json()
    assert body["model_id"] == "exo-tiny"
    one, two = body["previews"]
    # 8 layers of 1000 bytes: node0 (6000 available) cannot hold them alone, node0 + node1 can.
    assert one["n_nodes"] == 1
    assert one["placement"] is None
    assert one["refusal"]["reasons"] == [
        "node0: needs 7.81 KiB for layers 0-7, has 5.86 KiB available (short by 1.95 KiB)"
    ]
    assert two["n_nodes"] == 2
    assert two["refusal"] is None
    assert two["placement"] == {
        "shard_assignments": {
            "node0": {"start_layer": 0, "end_layer": 5, "n_layers": 8},
            "node1": {"start_layer": 5, "end_layer": 8, "n_layers": 8},
        },
        "bytes_by_node": {"node0": 5000, "node1": 3000},
        "weights": "native",
        "weights_note": "",
    }


def test_previews_errors(client: TestClient[Any]) -> None:
    assert_error(client.get("/instance/previews"), 400, "invalid_request", "model_id")
    assert_error(client.get("/instance/previews?model_id=nope"), 404, "model_not_found")


def test_get_instance(client: TestClient[Any], services: FakeNodeServices) -> None:
    instance = Instance(
        instance_id="i-7",
        model_id="exo-tiny",
        sharding="Pipeline",
        status="failed",
        shard_assignments={"node0": ShardAssignment(0, 8, 8)},
        runners={"node0": RunnerInfo("failed", "out of memory")},
        failure_reason="out of memory",
    )
    services.current_state = msgspec.structs.replace(services.current_state, instances={"i-7": instance})
    body = client.get("/instance/i-7").json()
    assert body == msgspec.to_builtins(instance)
    assert body["status"] == "failed"
    assert body["failure_reason"] == "out of memory"
    assert body["runners"]["node0"]["reason"] == "out of memory"
    assert body["shard_assignments"] == {"node0": {"start_layer": 0, "end_layer": 8, "n_layers": 8}}


def test_delete_instance(client: TestClient[Any], services: FakeNodeServices) -> None:
    response = client.delete("/instance/i-7")
    assert response.status_code == 200
    assert response.json() == {"instance_id": "i-7", "deleted": True}
    assert "i-7" not in services.current_state.instances
    assert_error(client.get("/instance/i-7"), 404, "instance_not_found")
    assert_error(client.delete("/instance/i-7"), 404, "instance_not_found")


@pytest.mark.parametrize("instance_id", ["-leading-dash", "has%20space", "a" * 129, "semi;colon"])
def test_instance_id_is_validated(client: TestClient[Any], instance_id: str) -> None:
    assert_error(client.get(f"/instance/{instance_id}"), 400, "invalid_request", "instance_id")
    assert_error(client.delete(f"/instance/{instance_id}"), 400, "invalid_request", "instance_id")


def test_unknown_route_and_wrong_method(client: TestClient[Any]) -> None:
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.put("/health"), 405, "method_not_allowed")


def test_request_body_is_bounded(services: FakeNodeServices) -> None:
    with TestClient(create_app(services, max_request_bytes=1024)) as client:
        body = {"model_id": "exo-tiny", "padding": "x" * 2048}
        assert_error(client.post("/place_instance", json=body), 413, "request_too_large")
        assert client.post("/place_instance", json={"model_id": "exo-tiny"}).status_code == 200


def test_unexpected_error_is_an_error_object(client: TestClient[Any], services: FakeNodeServices) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("bug")

    services.node_status = broken  # type: ignore[method-assign]
    message = assert_error(client.get("/node_status"), 500, "internal_error")
    assert "RuntimeError" in message


def test_cors(client: TestClient[Any]) -> None:
    response = client.get("/health", headers={"Origin": "http://dashboard.local"})
    assert response.headers["access-control-allow-origin"] == "*"
    preflight = client.options(
        "/v1/chat/completions",
        headers={
            "Origin": "http://dashboard.local",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"


def test_openapi_schema_lists_every_route(client: TestClient[Any]) -> None:
    schema = client.get("/schema/openapi.json").json()
    assert schema["info"]["title"] == "exo"
    assert set(schema["paths"]) >= {
        "/health",
        "/node_id",
        "/node_status",
        "/state",
        "/events",
        "/models",
        "/v1/models",
        "/place_instance",
        "/instance/previews",
        "/instance/{instance_id}",
        "/v1/chat/completions",
    }
    assert "delete" in schema["paths"]["/instance/{instance_id}"]
