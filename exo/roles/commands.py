"""What the master does with a command: a pure decision of events to sequence and the answer."""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field

from exo.core.events import Event, InstanceCreated, InstanceDeleted, NodeLabelled, NodeRemoved
from exo.core.messages import (
    Command,
    CommandAnswer,
    Deleted,
    DeleteInstance,
    Labelled,
    LabelNode,
    Placed,
    PlaceInstance,
    RefusalReason,
    Refused,
    Removed,
    RemoveNode,
)
from exo.core.models import ModelFootprint
from exo.core.placement import Placement, PlacementRefusal
from exo.core.state import Instance, State
from exo.roles.placement import place
from exo.roles.tensor_placement import place_tensor


@dataclass(frozen=True)
class CommandOutcome:
    answer: CommandAnswer
    events: list[Event] = field(default_factory=list[Event])


def _refused(reason: RefusalReason, detail: str) -> CommandOutcome:
    return CommandOutcome(Refused(reason, detail))


def reserved_bytes(state: State, footprints: Mapping[str, ModelFootprint]) -> dict[str, int]:
    """Memory promised to instances still loading (not yet visible in the nodes' measurements)."""
    reserved: dict[str, int] = {}
    for instance in state.instances.values():
        footprint = footprints.get(instance.model_id)
        if instance.status not in ("placing", "downloading", "loading") or footprint is None:
            continue
        for node_id, shard in instance.shard_assignments.items():
            held = footprint.held_as(instance.weights)
            if instance.sharding == "Tensor":
                stage = held.tensor_rank_bytes(shard.size)
            else:
                stage = held.stage_bytes(shard.start_layer, shard.end_layer)
            reserved[node_id] = reserved.get(node_id, 0) + stage
    return reserved


def decide(
    command: Command,
    state: State,
    nodes_with_model: Mapping[str, set[str]],
    new_instance_id: str,
    answering: Container[str] = (),
) -> CommandOutcome:
    """`nodes_with_model`: model id -> nodes that have it in their models dir (from heartbeats).
    `answering`: the nodes the master hears now (a node that answers is never removed)."""
    match command:
        case PlaceInstance():
            return _place(command, state, nodes_with_model, new_instance_id)
        case DeleteInstance(instance_id=instance_id):
            if instance_id not in state.instances:
                return _refused("instance_not_found", f"instance {instance_id!r} not found")
            return CommandOutcome(Deleted(instance_id), [InstanceDeleted(instance_id)])
        case LabelNode(node_id=node_id, key=key, value=value):
            if node_id not in state.nodes:
                return _refused("node_not_found", f"node {node_id!r} not found")
            return CommandOutcome(Labelled(node_id), [NodeLabelled(node_id, key, value)])
        case RemoveNode(node_id=node_id):
            if node_id not in state.nodes:
                return _refused("node_not_found", f"node {node_id!r} not found")
            if node_id in answering:
                return _refused("node_answers", f"node {node_id!r} still answers; stop it first")
            return CommandOutcome(Removed(node_id), [NodeRemoved(node_id)])


def _place(
    command: PlaceInstance,
    state: State,
    nodes_with_model: Mapping[str, set[str]],
    instance_id: str,
    *,
    at_most_available: bool = False,
) -> CommandOutcome:
    """`at_most_available`: a re-placement asks for min_nodes or every candidate left, if fewer."""
    holders = nodes_with_model.get(command.model_id, set())
    alive = [node for node in state.nodes.values() if node.status == "alive"]
    candidates = [node for node in alive if node.node_id in holders]
    if not candidates and not command.download:
        return _refused("model_not_held", f"no alive node has model {command.model_id!r} in its models dir")
    reserved = reserved_bytes(state, {command.model_id: command.footprint})
    min_nodes = min(command.min_nodes, len(candidates)) if at_most_available else command.min_nodes
    # Nodes that already hold the model first: a download is placed on the others only when
    # the holders alone cannot take it.
    placer = place_tensor if command.sharding == "Tensor" else place
    result = placer(command.footprint, candidates, min_nodes, reserved) if candidates else None
    if command.download and not isinstance(result, Placement):
        result = placer(command.footprint, alive, command.min_nodes, reserved)
    assert result is not None
    if isinstance(result, PlacementRefusal):
        return _refused("does_not_fit", f"cannot place {command.model_id!r}: {'; '.join(result.reasons)}")
    created = InstanceCreated(
        instance_id=instance_id,
        model_id=command.model_id,
        sharding=command.sharding,
        shard_assignments=result.shard_assignments,
        min_nodes=command.min_nodes,
        weights=result.weights,
        weights_note=result.weights_note,
    )
    return CommandOutcome(Placed(instance_id), [created])


def gone_node_failure(reason: str | None) -> bool:
    """Failures that re-placement can fix: a stage's node went away (not a model that cannot load)."""
    return reason is not None and reason.startswith("node ") and reason.endswith(" gone")


def _tensor_rank_gone(state: State, instance: Instance) -> bool:
    """A tensor instance whose node went away: its surviving ranks failed first (their ring broke,
    so the failure names them, not the gone node), and it is re-placed all the same."""
    return instance.sharding == "Tensor" and any(
        (node := state.nodes.get(node_id)) is None or node.status == "gone"
        for node_id in instance.shard_assignments
    )


def _tensor_rank_stalled(instance: Instance) -> bool:
    """A tensor instance whose ranks cut their ring because a peer froze in a collective: its
    nodes are alive, and a fresh instance (the frozen runner is killed when this one is deleted)
    can serve again."""
    return instance.sharding == "Tensor" and any(
        runner.failure == "tensor_stall" for runner in instance.runners.values()
    )


def replacement_events(
    state: State,
    nodes_with_model: Mapping[str, set[str]],
    footprint_of: Callable[[str], ModelFootprint | None],
    new_instance_id: Callable[[], str],
) -> list[Event]:
    """Re-place every instance that failed because a stage's node went away (or, for a tensor
    instance, a rank froze and the others cut their ring), on the nodes still alive.

    The failed instance is deleted and a new one created (same model, at least the `min_nodes` it was
    placed with, or every node left that has the model when fewer remain), so requests in flight on
    it end and new requests use the new one. An instance that no longer fits stays failed.
    """
    events: list[Event] = []
    for instance_id, instance in sorted(state.instances.items()):
        if instance.status != "failed" or not (
            gone_node_failure(instance.failure_reason)
            or _tensor_rank_gone(state, instance)
            or _tensor_rank_stalled(instance)
        ):
            continue
        footprint = footprint_of(instance.model_id)
        if footprint is None:
            continue
        # A Hugging Face model (`org/name`; a folder name has no slash) no node holds whole is
        # placed as place_instance places it: the chosen nodes fetch what they lack (resuming
        # the bytes a node that died mid-download had), else a stage's node dying mid-download
        # would leave its instance failed for good.
        download = "/" in instance.model_id
        command = PlaceInstance(
            instance.model_id, footprint, instance.sharding, instance.min_nodes, download=download
        )
        outcome = _place(command, state, nodes_with_model, new_instance_id(), at_most_available=True)
        if isinstance(outcome.answer, Placed):
            events.extend([InstanceDeleted(instance_id), *outcome.events])
    return events
