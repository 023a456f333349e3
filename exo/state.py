"""The cluster state and the pure `apply` that folds indexed events into it.

`apply` has no clock, no I/O and no logging: the state is a function of the log alone, which is
what lets `exo-replay` rebuild on any node exactly what that node served.
"""

from __future__ import annotations

from typing import Literal, assert_never

import msgspec
from msgspec.structs import replace

from exo.events import (
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    MasterElected,
    NodeJoined,
    NodeLabelled,
    NodeMemoryMeasured,
    NodeTimedOut,
    RunnerStatus,
    RunnerStatusUpdated,
    ShardAssignment,
    Sharding,
)

NodeStatus = Literal["alive", "gone"]
InstanceStatus = Literal["placing", "loading", "ready", "failed"]


class NodeInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node_id: str
    status: NodeStatus
    memory_total_bytes: int
    memory_available_bytes: int
    bus_address: str = ""
    hostname: str = ""
    labels: dict[str, str] = {}


class RunnerInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    status: RunnerStatus
    reason: str | None = None
    activation_address: str | None = None


class Instance(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    instance_id: str
    model_id: str
    sharding: Sharding
    status: InstanceStatus
    shard_assignments: dict[str, ShardAssignment]
    runners: dict[str, RunnerInfo] = {}
    failure_reason: str | None = None

    def stage_order(self) -> list[str]:
        """Node ids in pipeline order (by first layer)."""
        return sorted(self.shard_assignments, key=lambda node_id: self.shard_assignments[node_id].start_layer)

    def route(self) -> list[str] | None:
        """Activation addresses of the stages in pipeline order, when every stage is ready."""
        addresses: list[str] = []
        for node_id in self.stage_order():
            runner = self.runners.get(node_id)
            if runner is None or runner.status != "ready" or runner.activation_address is None:
                return None
            addresses.append(runner.activation_address)
        return addresses


class State(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    master_node_id: str | None = None
    term: int = 0
    last_event_index: int = 0
    nodes: dict[str, NodeInfo] = {}
    instances: dict[str, Instance] = {}


def apply(state: State, indexed: IndexedEvent) -> State:
    """Fold one indexed event into the state. Indices are checked by the caller (the sequencer)."""
    match indexed.event:
        case MasterElected() as event:
            state = _apply_master_elected(state, event)
        case NodeJoined() as event:
            state = _apply_node_joined(state, event)
        case NodeTimedOut() as event:
            state = _apply_node_timed_out(state, event)
        case NodeMemoryMeasured() as event:
            state = _apply_node_memory_measured(state, event)
        case NodeLabelled() as event:
            state = _apply_node_labelled(state, event)
        case InstanceCreated() as event:
            state = _apply_instance_created(state, event)
        case InstanceDeleted() as event:
            state = _apply_instance_deleted(state, event)
        case RunnerStatusUpdated() as event:
            state = _apply_runner_status_updated(state, event)
        case _:
            assert_never(indexed.event)
    return replace(state, last_event_index=indexed.index)


def _apply_master_elected(state: State, event: MasterElected) -> State:
    return replace(state, master_node_id=event.node_id, term=max(state.term, event.term))


def _apply_node_joined(state: State, event: NodeJoined) -> State:
    previous = state.nodes.get(event.node_id)
    node = NodeInfo(
        node_id=event.node_id,
        status="alive",
        memory_total_bytes=event.memory_total_bytes,
        memory_available_bytes=event.memory_available_bytes,
        bus_address=event.bus_address,
        hostname=event.hostname,
        labels=previous.labels if previous is not None else {},
    )
    return replace(state, nodes={**state.nodes, event.node_id: node})


def _apply_node_timed_out(state: State, event: NodeTimedOut) -> State:
    node = state.nodes.get(event.node_id)
    if node is None:
        return state
    nodes = {**state.nodes, event.node_id: replace(node, status="gone")}
    # A gone node's runners are gone with it: every instance with a stage there has failed.
    instances = dict(state.instances)
    for instance_id, instance in state.instances.items():
        if event.node_id in instance.shard_assignments and instance.status != "failed":
            runners = {**instance.runners, event.node_id: RunnerInfo("failed", f"node {event.node_id} gone")}
            instances[instance_id] = _with_runners(instance, runners)
    return replace(state, nodes=nodes, instances=instances)


def _apply_node_memory_measured(state: State, event: NodeMemoryMeasured) -> State:
    node = state.nodes.get(event.node_id)
    if node is None:
        return state
    node = replace(
        node,
        memory_total_bytes=event.memory_total_bytes,
        memory_available_bytes=event.memory_available_bytes,
    )
    return replace(state, nodes={**state.nodes, event.node_id: node})


def _apply_node_labelled(state: State, event: NodeLabelled) -> State:
    node = state.nodes.get(event.node_id)
    if node is None:
        return state
    node = replace(node, labels={**node.labels, event.key: event.value})
    return replace(state, nodes={**state.nodes, event.node_id: node})


def _apply_instance_created(state: State, event: InstanceCreated) -> State:
    instance = Instance(
        instance_id=event.instance_id,
        model_id=event.model_id,
        sharding=event.sharding,
        status="placing",
        shard_assignments=event.shard_assignments,
    )
    return replace(state, instances={**state.instances, event.instance_id: instance})


def _apply_instance_deleted(state: State, event: InstanceDeleted) -> State:
    if event.instance_id not in state.instances:
        return state
    instances = {k: v for k, v in state.instances.items() if k != event.instance_id}
    return replace(state, instances=instances)


def _apply_runner_status_updated(state: State, event: RunnerStatusUpdated) -> State:
    instance = state.instances.get(event.instance_id)
    if instance is None or event.node_id not in instance.shard_assignments:
        return state
    if instance.status == "failed" and event.status != "failed":
        # A failed instance stays failed until it is deleted or placed again: a late "ready"
        # from a surviving stage must not resurrect a pipeline with a hole in it.
        runners = {**instance.runners, event.node_id: _runner_info(event)}
        instance = replace(instance, runners=runners)
        return replace(state, instances={**state.instances, event.instance_id: instance})
    runners = {**instance.runners, event.node_id: _runner_info(event)}
    return replace(state, instances={**state.instances, event.instance_id: _with_runners(instance, runners)})


def _runner_info(event: RunnerStatusUpdated) -> RunnerInfo:
    return RunnerInfo(event.status, event.reason, event.activation_address)


def _with_runners(instance: Instance, runners: dict[str, RunnerInfo]) -> Instance:
    status, reason = _instance_status(instance.shard_assignments, runners)
    if instance.status == "failed":
        status, reason = "failed", instance.failure_reason
    return replace(instance, runners=runners, status=status, failure_reason=reason)


def _instance_status(
    assignments: dict[str, ShardAssignment], runners: dict[str, RunnerInfo]
) -> tuple[InstanceStatus, str | None]:
    for node_id in sorted(runners):
        runner = runners[node_id]
        if runner.status in ("failed", "stopped"):
            return "failed", runner.reason or f"runner on {node_id} {runner.status}"
    if assignments and all(
        runners.get(node_id, RunnerInfo("loading")).status == "ready" for node_id in assignments
    ):
        return "ready", None
    if runners:
        return "loading", None
    return "placing", None


state_encoder = msgspec.msgpack.Encoder()
state_decoder = msgspec.msgpack.Decoder(State)


def encode_state(state: State) -> bytes:
    return state_encoder.encode(state)


def decode_state(data: bytes) -> State:
    return state_decoder.decode(data)


def state_document(state: State) -> bytes:
    """The JSON state document of DESIGN.md (`GET /state`, `exo-replay --json`)."""
    return msgspec.json.encode(state)
