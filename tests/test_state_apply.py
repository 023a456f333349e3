"""One test (or a few) per `_apply_*` in exo/core/state.py, through the public `apply`."""

from __future__ import annotations

from exo.core.events import (
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    MasterElected,
    NodeJoined,
    NodeLabelled,
    NodeMemoryMeasured,
    NodeTimedOut,
    RunnerStatusUpdated,
    ShardAssignment,
)
from exo.core.state import State, apply

TWO_STAGES = {"a": ShardAssignment(0, 4, 8), "b": ShardAssignment(4, 8, 8)}


def fold(*events: Event, state: State | None = None) -> State:
    state = state if state is not None else State()
    for event in events:
        state = apply(state, IndexedEvent(state.last_event_index + 1, 1, "test", 0, event))
    return state


def cluster_with_instance() -> State:
    return fold(
        NodeJoined("a", "10.0.0.1:52414", 100, 80),
        NodeJoined("b", "10.0.0.2:52414", 200, 150),
        NodeJoined("c", "10.0.0.3:52414", 300, 250),
        InstanceCreated("i-1", "tiny", "Pipeline", TWO_STAGES),
    )


def test_every_event_sets_last_event_index_and_leaves_the_input_alone() -> None:
    before = State()
    after = apply(before, IndexedEvent(7, 1, "n", 3, NodeLabelled("nobody", "k", "v")))
    assert after.last_event_index == 7
    assert before == State()


def test_master_elected_sets_master_and_term() -> None:
    state = fold(MasterElected(term=3, node_id="a"))
    assert (state.master_node_id, state.term) == ("a", 3)
    state = fold(MasterElected(term=5, node_id="b"), state=state)
    assert (state.master_node_id, state.term) == ("b", 5)


def test_node_joined_adds_an_alive_node_with_its_figures() -> None:
    state = fold(NodeJoined("a", "10.0.0.1:52414", 100, 80, hostname="laptop"))
    node = state.nodes["a"]
    assert (node.status, node.memory_total_bytes, node.memory_available_bytes) == ("alive", 100, 80)
    assert (node.bus_address, node.hostname, node.labels) == ("10.0.0.1:52414", "laptop", {})


def test_node_rejoining_after_timing_out_is_alive_again_and_keeps_its_labels() -> None:
    state = fold(
        NodeJoined("a", "10.0.0.1:52414", 100, 80),
        NodeLabelled("a", "rack", "2"),
        NodeTimedOut("a"),
    )
    assert state.nodes["a"].status == "gone"
    state = fold(NodeJoined("a", "10.0.0.9:52414", 100, 60), state=state)
    node = state.nodes["a"]
    assert (node.status, node.bus_address, node.memory_available_bytes) == ("alive", "10.0.0.9:52414", 60)
    assert node.labels == {"rack": "2"}


def test_node_timed_out_marks_the_node_gone() -> None:
    state = fold(NodeJoined("a", "x", 1, 1), NodeTimedOut("a"))
    assert state.nodes["a"].status == "gone"


def test_node_timed_out_of_an_unknown_node_changes_nothing_but_the_index() -> None:
    state = cluster_with_instance()
    after = fold(NodeTimedOut("stranger"), state=state)
    assert after.nodes == state.nodes
    assert after.instances == state.instances


def test_node_timed_out_fails_the_instances_with_a_stage_on_it_only() -> None:
    state = fold(
        InstanceCreated("i-2", "tiny", "Pipeline", {"c": ShardAssignment(0, 8, 8)}),
        RunnerStatusUpdated("i-1", "a", "ready"),
        RunnerStatusUpdated("i-1", "b", "ready"),
        state=cluster_with_instance(),
    )
    assert state.instances["i-1"].status == "ready"
    state = fold(NodeTimedOut("b"), state=state)
    failed = state.instances["i-1"]
    assert failed.status == "failed"
    assert failed.failure_reason is not None and "b" in failed.failure_reason
    assert failed.runners["b"].status == "failed"
    assert state.instances["i-2"].status == "placing"


def test_node_memory_measured_updates_the_figures() -> None:
    state = fold(NodeJoined("a", "x", 100, 80), NodeMemoryMeasured("a", 120, 30))
    node = state.nodes["a"]
    assert (node.memory_total_bytes, node.memory_available_bytes) == (120, 30)


def test_node_memory_measured_of_an_unknown_node_changes_nothing() -> None:
    state = fold(NodeMemoryMeasured("stranger", 1, 1))
    assert state.nodes == {}


def test_node_labelled_adds_and_overwrites_labels() -> None:
    state = fold(
        NodeJoined("a", "x", 1, 1),
        NodeLabelled("a", "rack", "1"),
        NodeLabelled("a", "zone", "eu"),
        NodeLabelled("a", "rack", "2"),
    )
    assert state.nodes["a"].labels == {"rack": "2", "zone": "eu"}


def test_node_labelled_of_an_unknown_node_changes_nothing() -> None:
    assert fold(NodeLabelled("stranger", "k", "v")).nodes == {}


def test_instance_created_is_placing_with_its_assignments() -> None:
    instance = cluster_with_instance().instances["i-1"]
    assert (instance.model_id, instance.sharding, instance.status) == ("tiny", "Pipeline", "placing")
    assert instance.shard_assignments == TWO_STAGES
    assert instance.runners == {}
    assert instance.stage_order() == ["a", "b"]


def test_instance_deleted_removes_it() -> None:
    state = fold(InstanceDeleted("i-1"), state=cluster_with_instance())
    assert state.instances == {}


def test_instance_deleted_of_an_unknown_instance_changes_nothing() -> None:
    state = cluster_with_instance()
    assert fold(InstanceDeleted("i-404"), state=state).instances == state.instances


def test_runner_status_moves_the_instance_placing_loading_ready() -> None:
    state = cluster_with_instance()
    assert state.instances["i-1"].status == "placing"
    state = fold(RunnerStatusUpdated("i-1", "a", "loading"), state=state)
    assert state.instances["i-1"].status == "loading"
    state = fold(RunnerStatusUpdated("i-1", "a", "ready"), state=state)
    assert state.instances["i-1"].status == "loading", "one stage of two ready is still loading"
    state = fold(RunnerStatusUpdated("i-1", "b", "ready"), state=state)
    instance = state.instances["i-1"]
    assert (instance.status, instance.failure_reason) == ("ready", None)
    assert {node_id: runner.status for node_id, runner in instance.runners.items()} == {
        "a": "ready",
        "b": "ready",
    }


def test_a_failed_runner_fails_the_instance_with_its_reason() -> None:
    state = fold(
        RunnerStatusUpdated("i-1", "a", "ready"),
        RunnerStatusUpdated("i-1", "b", "failed", reason="out of memory"),
        state=cluster_with_instance(),
    )
    instance = state.instances["i-1"]
    assert (instance.status, instance.failure_reason) == ("failed", "out of memory")


def test_a_stopped_runner_fails_the_instance() -> None:
    state = fold(RunnerStatusUpdated("i-1", "a", "stopped"), state=cluster_with_instance())
    instance = state.instances["i-1"]
    assert instance.status == "failed"
    assert instance.failure_reason is not None and "a" in instance.failure_reason


def test_a_failed_instance_stays_failed_when_runners_report_ready_later() -> None:
    state = fold(
        RunnerStatusUpdated("i-1", "a", "failed", reason="crashed"),
        RunnerStatusUpdated("i-1", "a", "ready"),
        RunnerStatusUpdated("i-1", "b", "ready"),
        state=cluster_with_instance(),
    )
    instance = state.instances["i-1"]
    assert (instance.status, instance.failure_reason) == ("failed", "crashed")
    assert instance.runners["b"].status == "ready", "the runner's own report is still recorded"


def test_a_failed_instance_keeps_its_first_reason_when_a_node_times_out() -> None:
    state = fold(
        RunnerStatusUpdated("i-1", "a", "failed", reason="crashed"),
        NodeTimedOut("b"),
        state=cluster_with_instance(),
    )
    instance = state.instances["i-1"]
    assert (instance.status, instance.failure_reason) == ("failed", "crashed")


def test_runner_status_of_an_unknown_instance_or_a_node_without_a_stage_changes_nothing() -> None:
    state = cluster_with_instance()
    after = fold(
        RunnerStatusUpdated("i-404", "a", "ready"),
        RunnerStatusUpdated("i-1", "c", "failed"),
        state=state,
    )
    assert after.instances == state.instances


def test_a_ready_runner_records_its_activation_address() -> None:
    state = fold(
        RunnerStatusUpdated("i-1", "b", "ready", activation_address="tcp://10.0.0.2:6000"),
        RunnerStatusUpdated("i-1", "a", "ready", activation_address="tcp://10.0.0.1:6000"),
        state=cluster_with_instance(),
    )
    instance = state.instances["i-1"]
    assert instance.runners["b"].activation_address == "tcp://10.0.0.2:6000"
    assert instance.route() == ["tcp://10.0.0.1:6000", "tcp://10.0.0.2:6000"]
