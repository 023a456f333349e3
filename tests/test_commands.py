"""The master's pure decisions: commands to events, re-placement after a node is gone, runner plans."""

from __future__ import annotations

import msgspec
import pytest

from exo.core.events import (
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    NodeJoined,
    NodeLabelled,
    NodeRemoved,
    NodeTimedOut,
    RunnerStatusUpdated,
    ShardAssignment,
    decode_event,
    encode_event,
)
from exo.core.messages import (
    CommandAnswered,
    Deleted,
    DeleteInstance,
    Labelled,
    LabelNode,
    Placed,
    PlaceInstance,
    Refused,
    Removed,
    RemoveNode,
)
from exo.core.models import ModelFootprint, ModelInfo
from exo.core.state import State, apply
from exo.node.worker import LocalRunner, Worker
from exo.roles.commands import decide, replacement_events, reserved_bytes
from exo.roles.worker_plan import StartRunner, StopRunner, plan

GIB = 1024**3
FOOTPRINT = ModelFootprint.uniform(12, GIB // 4)


def state_of(*events: object) -> State:
    state = State()
    for index, event in enumerate(events, start=1):
        state = apply(state, IndexedEvent(index, 1, "m", -1, event))  # type: ignore[arg-type]
    return state


def cluster(*node_ids: str) -> State:
    return state_of(*(NodeJoined(node_id, f"{node_id}:1", 16 * GIB, 8 * GIB) for node_id in node_ids))


def test_place_instance_creates_it_on_nodes_that_have_the_model() -> None:
    state = cluster("a", "b")
    outcome = decide(PlaceInstance("m", FOOTPRINT, "Pipeline", 2), state, {"m": {"a", "b"}}, "i-1")
    assert outcome.answer == Placed("i-1")
    (created,) = outcome.events
    assert isinstance(created, InstanceCreated) and set(created.shard_assignments) == {"a", "b"}


def test_place_instance_refusals() -> None:
    state = cluster("a")
    nobody = decide(PlaceInstance("m", FOOTPRINT), state, {}, "i-1")
    assert isinstance(nobody.answer, Refused) and nobody.answer.reason == "model_not_held"
    assert "no alive node" in nobody.answer.detail
    too_big = ModelFootprint.uniform(4, 64 * GIB)
    refused = decide(PlaceInstance("m", too_big), state, {"m": {"a"}}, "i-1")
    assert isinstance(refused.answer, Refused) and refused.answer.reason == "does_not_fit"
    assert "cannot place 'm'" in refused.answer.detail and refused.events == []


def test_delete_and_label() -> None:
    state = cluster("a")
    missing = decide(DeleteInstance("nope"), state, {}, "x").answer
    assert isinstance(missing, Refused) and missing.reason == "instance_not_found"
    labelled = decide(LabelNode("a", "rack", "3"), state, {}, "x")
    assert labelled.answer == Labelled("a") and labelled.events == [NodeLabelled("a", "rack", "3")]
    unknown = decide(LabelNode("zz", "k", "v"), state, {}, "x").answer
    assert isinstance(unknown, Refused) and unknown.reason == "node_not_found"


def test_remove_node_only_when_it_no_longer_answers() -> None:
    state = cluster("a", "b")
    removed = decide(RemoveNode("b"), state, {}, "x", answering={"a"})
    assert removed.answer == Removed("b") and removed.events == [NodeRemoved("b")]
    answers = decide(RemoveNode("b"), state, {}, "x", answering={"a", "b"})
    assert isinstance(answers.answer, Refused) and answers.answer.reason == "node_answers"
    assert answers.events == []
    unknown = decide(RemoveNode("zz"), state, {}, "x").answer
    assert isinstance(unknown, Refused) and unknown.reason == "node_not_found"


def test_a_removed_node_leaves_the_state_and_its_instances_fail() -> None:
    created = InstanceCreated(
        "i-1", "m", "Pipeline", {"a": ShardAssignment(0, 6, 12), "b": ShardAssignment(6, 12, 12)}
    )
    state = state_of(NodeJoined("a", "a:1"), NodeJoined("b", "b:1"), created, NodeRemoved("b"))
    assert set(state.nodes) == {"a"}
    assert state.instances["i-1"].status == "failed"
    assert state_of(NodeJoined("a", "a:1"), NodeRemoved("zz")).nodes.keys() == {"a"}


def test_command_answers_carry_no_http_status_and_refuse_unknown_reasons() -> None:
    """The cluster protocol says what happened; only the API maps it to an HTTP status."""
    for answer in (Placed("i-1"), Deleted("i-1"), Labelled("a"), Refused("not_master", "not the master")):
        encoded = msgspec.msgpack.encode(CommandAnswered(answer))
        assert msgspec.msgpack.decode(encoded, type=CommandAnswered) == CommandAnswered(answer)
        assert b"status_code" not in encoded
    bad = msgspec.msgpack.encode(
        {"type": "CommandAnswered", "answer": {"type": "Refused", "reason": "teapot"}}
    )
    with pytest.raises(msgspec.ValidationError, match="reason"):
        msgspec.msgpack.decode(bad, type=CommandAnswered)


def test_instance_that_lost_a_node_is_replaced_on_the_survivors() -> None:
    assignments = {"a": ShardAssignment(0, 6, 12), "b": ShardAssignment(6, 12, 12)}
    state = state_of(
        NodeJoined("a", "a:1", 16 * GIB, 8 * GIB),
        NodeJoined("b", "b:1", 16 * GIB, 8 * GIB),
        NodeJoined("c", "c:1", 16 * GIB, 8 * GIB),
        InstanceCreated("i-1", "m", "Pipeline", assignments),
        NodeTimedOut("b"),
    )
    assert state.instances["i-1"].status == "failed"
    events = replacement_events(state, {"m": {"a", "b", "c"}}, lambda model_id: FOOTPRINT, lambda: "i-2")
    assert events[0] == InstanceDeleted("i-1")
    created = events[1]
    assert isinstance(created, InstanceCreated) and created.instance_id == "i-2"
    assert "b" not in created.shard_assignments


def test_a_hub_model_no_node_holds_whole_is_replaced_and_fetched_again() -> None:
    """A stage's node died mid-download: no node holds the Hub model whole, so the instance is
    re-placed as place_instance places a download (the new stages fetch what they lack); a
    folder model nobody holds stays failed, as before."""
    assignments = {"a": ShardAssignment(0, 6, 12), "b": ShardAssignment(6, 12, 12)}
    for model_id, replaced in (("org/m", True), ("m", False)):
        state = state_of(
            NodeJoined("a", "a:1", 16 * GIB, 8 * GIB),
            NodeJoined("b", "b:1", 16 * GIB, 8 * GIB),
            NodeJoined("c", "c:1", 16 * GIB, 8 * GIB),
            InstanceCreated("i-1", model_id, "Pipeline", assignments, min_nodes=2),
            NodeTimedOut("b"),
        )
        events = replacement_events(state, {}, lambda model_id: FOOTPRINT, lambda: "i-2")
        if not replaced:
            assert events == []
            continue
        assert events[0] == InstanceDeleted("i-1")
        created = events[1]
        assert isinstance(created, InstanceCreated) and sorted(created.shard_assignments) == ["a", "c"]


@pytest.mark.parametrize(
    ("placed_on", "min_nodes", "alive_after", "stages_after"),
    [
        (3, 3, 2, 2),  # fewer nodes left than asked for: every node left, not 1
        (3, 3, 3, 3),  # one gone, three left: the min_nodes asked for
        (2, 2, 4, 2),
        (2, 1, 3, 1),  # asked for 1 (placed on 2 for memory): the fewest that fit, as placed
    ],
)
def test_a_replacement_keeps_the_min_nodes_it_was_placed_with(
    placed_on: int, min_nodes: int, alive_after: int, stages_after: int
) -> None:
    nodes = [f"n{i}" for i in range(alive_after + 1)]
    width = 12 // placed_on
    assignments = {nodes[i]: ShardAssignment(i * width, (i + 1) * width, 12) for i in range(placed_on)}
    state = state_of(
        *(NodeJoined(node, f"{node}:1", 16 * GIB, 8 * GIB) for node in nodes),
        InstanceCreated("i-1", "m", "Pipeline", assignments, min_nodes=min_nodes),
        NodeTimedOut(nodes[0]),
    )
    assert state.instances["i-1"].min_nodes == min_nodes
    events = replacement_events(state, {"m": set(nodes)}, lambda model_id: FOOTPRINT, lambda: "i-2")
    assert events[0] == InstanceDeleted("i-1")
    created = events[1]
    assert isinstance(created, InstanceCreated)
    assert len(created.shard_assignments) == stages_after
    assert nodes[0] not in created.shard_assignments
    assert created.min_nodes == min_nodes  # what the user asked for, for the next failover too


def test_place_instance_records_min_nodes() -> None:
    outcome = decide(
        PlaceInstance("m", FOOTPRINT, "Pipeline", 2), cluster("a", "b", "c"), {"m": {"a", "b", "c"}}, "i"
    )
    (created,) = outcome.events
    assert isinstance(created, InstanceCreated) and created.min_nodes == 2


def test_instance_failed_for_another_reason_is_not_replaced() -> None:
    state = state_of(
        NodeJoined("a", "a:1", 16 * GIB, 8 * GIB),
        InstanceCreated("i-1", "m", "Pipeline", {"a": ShardAssignment(0, 12, 12)}),
        RunnerStatusUpdated("i-1", "a", "failed", "model has no layers"),
    )
    assert replacement_events(state, {"m": {"a"}}, lambda model_id: FOOTPRINT, lambda: "i-2") == []


def test_worker_plan_starts_missing_runners_and_stops_orphans() -> None:
    state = state_of(
        NodeJoined("a", "a:1"),
        InstanceCreated("i-1", "m", "Pipeline", {"a": ShardAssignment(0, 4, 4)}),
        InstanceCreated("i-2", "m", "Pipeline", {"b": ShardAssignment(0, 4, 4)}),
    )
    assert plan(state, "a", {}) == [StartRunner("i-1", "m", ShardAssignment(0, 4, 4))]
    assert plan(state, "a", {"i-1": "ready"}) == []
    assert plan(state, "a", {"i-1": "ready", "gone": "ready"}) == [StopRunner("gone")]
    assert plan(state, "a", {"gone": "stopping"}) == [StartRunner("i-1", "m", ShardAssignment(0, 4, 4))]
    failed = apply(state, IndexedEvent(4, 1, "m", -1, RunnerStatusUpdated("i-1", "a", "failed", "x")))
    assert plan(failed, "a", {"i-1": "failed"}) == [StopRunner("i-1")]


def test_a_worker_holds_its_stage_only_through_a_ready_runner_of_its_own_at_the_recorded_address() -> None:
    def no_model(model_id: str) -> ModelInfo:
        raise AssertionError(model_id)

    state = state_of(
        NodeJoined("a", "a:1"),
        InstanceCreated("i-1", "m", "Pipeline", {"a": ShardAssignment(0, 4, 4)}),
        InstanceCreated("i-2", "m", "Pipeline", {"b": ShardAssignment(0, 4, 4)}),
        RunnerStatusUpdated("i-1", "a", "ready", activation_address="tcp://a:7000"),
    )
    worker = Worker("a", no_model, lambda events: None)
    restored, elsewhere = state.instances["i-1"], state.instances["i-2"]
    assert worker.holds_its_stage(elsewhere)  # no stage here
    assert not worker.holds_its_stage(restored)  # the log's runner is not this process's
    worker.runners["i-1"] = LocalRunner("i-1", "i-1@a", None, status="loading")
    assert not worker.holds_its_stage(restored)
    worker.runners["i-1"] = LocalRunner(
        "i-1", "i-1@a", None, status="ready", activation_address="tcp://a:7001"
    )
    assert not worker.holds_its_stage(restored)  # ready, but its report is not applied yet
    report = RunnerStatusUpdated("i-1", "a", "ready", activation_address="tcp://a:7001")
    renewed = apply(state, IndexedEvent(5, 1, "m", -1, report))
    assert worker.holds_its_stage(renewed.instances["i-1"])


def test_membership_waits_longer_before_marking_a_node_gone() -> None:
    from exo.core.messages import Heartbeat, Rank
    from exo.roles.membership import membership_events

    state = cluster("a", "b")
    heartbeats = {
        node_id: Heartbeat(node_id, 1, "a", Rank(False, 0, node_id), 1, 16 * GIB, 8 * GIB) for node_id in "ab"
    }
    # b missed one liveness window but was heard within the longer one: not gone yet.
    assert membership_events(state, heartbeats, {"a"}, True, {}, recently_heard={"a", "b"}) == []
    assert membership_events(state, heartbeats, {"a"}, True, {}, recently_heard={"a"}) == [NodeTimedOut("b")]
    assert membership_events(state, heartbeats, {"a"}, False, {}, recently_heard={"a"}) == []


TENSOR_FOOTPRINT = msgspec.structs.replace(FOOTPRINT, attention_heads=8, kv_heads=4, tensor_parallel=True)


def test_tensor_placement_through_the_command_and_its_reserved_memory() -> None:
    state = cluster("a", "b")
    outcome = decide(PlaceInstance("m", TENSOR_FOOTPRINT, "Tensor", 2), state, {"m": {"a", "b"}}, "i-1")
    (created,) = outcome.events
    assert isinstance(created, InstanceCreated) and created.sharding == "Tensor"
    assert {(a.rank, a.size, a.start_layer, a.end_layer) for a in created.shard_assignments.values()} == {
        (0, 2, 0, 12),
        (1, 2, 0, 12),
    }
    placed = apply(state, IndexedEvent(state.last_event_index + 1, 1, "m", -1, created))
    assert reserved_bytes(placed, {"m": TENSOR_FOOTPRINT}) == {"a": 3 * GIB // 2, "b": 3 * GIB // 2}
    odd = decide(
        PlaceInstance("m", TENSOR_FOOTPRINT, "Tensor", 3), cluster("a", "b", "c"), {"m": {"a", "b", "c"}}, "i"
    )
    assert (
        isinstance(odd.answer, Refused)
        and "8 attention heads cannot be split evenly over 3" in odd.answer.detail
    )


def test_a_tensor_instance_is_replaced_when_a_node_went_although_a_survivor_failed_first() -> None:
    """A survivor's rank fails as soon as its ring breaks, before the node is timed out: the
    instance's failure then names the survivor, and it is re-placed all the same."""
    assignments = {"a": ShardAssignment(0, 12, 12, 0, 2), "b": ShardAssignment(0, 12, 12, 1, 2)}
    state = state_of(
        NodeJoined("a", "a:1", 16 * GIB, 8 * GIB),
        NodeJoined("b", "b:1", 16 * GIB, 8 * GIB),
        InstanceCreated("i-1", "m", "Tensor", assignments, min_nodes=2),
        RunnerStatusUpdated("i-1", "a", "failed", "tensor pass failed: [ring] connection to a peer was lost"),
        NodeTimedOut("b"),
    )
    events = replacement_events(state, {"m": {"a", "b"}}, lambda model_id: TENSOR_FOOTPRINT, lambda: "i-2")
    assert events[0] == InstanceDeleted("i-1")
    created = events[1]
    assert isinstance(created, InstanceCreated) and created.sharding == "Tensor"
    assert created.shard_assignments == {"a": ShardAssignment(0, 12, 12, 0, 1)}


def test_a_tensor_instance_whose_ranks_cut_a_frozen_peer_is_replaced_on_the_same_nodes() -> None:
    """Every node is alive (a rank's runner froze, its node did not): the rank that cut the ring
    names the stall, whichever rank's failure came first, and the instance is placed afresh.
    A tensor instance that failed for another reason with its nodes alive stays failed."""
    assignments = {"a": ShardAssignment(0, 12, 12, 0, 2), "b": ShardAssignment(0, 12, 12, 1, 2)}
    joined = [NodeJoined("a", "a:1", 16 * GIB, 8 * GIB), NodeJoined("b", "b:1", 16 * GIB, 8 * GIB)]
    created = InstanceCreated("i-1", "m", "Tensor", assignments, min_nodes=2)
    lost = RunnerStatusUpdated(
        "i-1", "b", "failed", "tensor pass failed: [ring] connection to a peer was lost"
    )
    stalled = RunnerStatusUpdated(
        "i-1",
        "a",
        "failed",
        "tensor rank stalled: rank 0's forward pass did not finish within 5 s",
        failure="tensor_stall",
    )
    state = state_of(*joined, created, lost, stalled)
    assert state.instances["i-1"].failure_reason == lost.reason  # the first failure names the instance
    events = replacement_events(state, {"m": {"a", "b"}}, lambda model_id: TENSOR_FOOTPRINT, lambda: "i-2")
    assert events[0] == InstanceDeleted("i-1")
    replaced = events[1]
    assert isinstance(replaced, InstanceCreated) and replaced.sharding == "Tensor"
    assert sorted(replaced.shard_assignments) == ["a", "b"]
    only_lost = state_of(*joined, created, lost)
    assert (
        replacement_events(only_lost, {"m": {"a", "b"}}, lambda model_id: TENSOR_FOOTPRINT, lambda: "i-2")
        == []
    )
    # The kind is typed: the same words without it (any other failure's text) re-place nothing.
    said_only = state_of(*joined, created, lost, msgspec.structs.replace(stalled, failure=None))
    assert (
        replacement_events(said_only, {"m": {"a", "b"}}, lambda model_id: TENSOR_FOOTPRINT, lambda: "i-2")
        == []
    )
    assert decode_event(encode_event(stalled)) == stalled
    old = {"type": "RunnerStatusUpdated", "instance_id": "i-1", "node_id": "b", "status": "failed"}
    assert decode_event(msgspec.msgpack.encode(old)) == RunnerStatusUpdated(
        "i-1", "b", "failed"
    )  # older logs
    with pytest.raises(msgspec.ValidationError):
        decode_event(msgspec.msgpack.encode({**old, "failure": "stalled"}))


def test_membership_never_adds_a_node_that_keeps_another_clusters_log() -> None:
    """Two empty nodes that did not hear each other each bootstrap a cluster of one; when they meet,
    neither adds the other (Raft cannot merge two committed histories), but a new empty node and a
    node the log already knows are added as usual."""
    from exo.core.messages import Heartbeat, Rank
    from exo.roles.membership import foreign_nodes, membership_events

    state = cluster("a")

    def heartbeat(node_id: str, last_index: int) -> Heartbeat:
        return Heartbeat(node_id, 1, node_id, Rank(False, last_index, node_id), 1, 16 * GIB, 8 * GIB)

    heartbeats = {"a": heartbeat("a", 7), "b": heartbeat("b", 3), "c": heartbeat("c", 0)}
    alive = {"a", "b", "c"}
    voters = frozenset({"a"})
    assert foreign_nodes(state, heartbeats, alive, voters) == {"b"}
    events = membership_events(state, heartbeats, alive, False, {}, voters=voters)
    assert [e.node_id for e in events if isinstance(e, NodeJoined)] == ["c"]
    # b already a voter (its NodeJoined proposed, not yet committed): it is ours, not foreign.
    assert foreign_nodes(state, heartbeats, alive, frozenset({"a", "b"})) == set()
