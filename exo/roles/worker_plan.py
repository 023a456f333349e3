"""The worker's plan, sans-IO: from the state and this node's runners, which to start and stop.

exo.node.worker carries the decisions out (subprocesses, control sockets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from exo.core.events import ShardAssignment
from exo.core.state import State

# "starting": the runner process is spawned and imports mlx; "waiting": it said RunnerStarted and
# waits for its stage's files (a Hub model still downloading) before it is sent its LoadShard.
LocalStatus = Literal["starting", "waiting", "loading", "ready", "failed", "stopping"]
LOCAL_TRANSITIONS: dict[LocalStatus, frozenset[LocalStatus]] = {
    "starting": frozenset({"waiting", "loading", "failed", "stopping"}),
    "waiting": frozenset({"loading", "failed", "stopping"}),
    "loading": frozenset({"ready", "failed", "stopping"}),
    "ready": frozenset({"failed", "stopping"}),
    "failed": frozenset({"stopping"}),
    "stopping": frozenset(),
}


@dataclass(frozen=True)
class StartRunner:
    instance_id: str
    model_id: str
    assignment: ShardAssignment
    # "native" when placement kept the checkpoint's representation for lack of memory
    placed_weights: Literal["float32", "native"] | None = None


@dataclass(frozen=True)
class StopRunner:
    instance_id: str


Decision = StartRunner | StopRunner


def plan(state: State, node_id: str, local: Mapping[str, LocalStatus]) -> list[Decision]:
    """Runners to start (a live instance has a shard here and no runner holds it) and to stop."""
    decisions: list[Decision] = []
    for instance_id, instance in sorted(state.instances.items()):
        assignment = instance.shard_assignments.get(node_id)
        if assignment is None or instance.status == "failed" or instance_id in local:
            continue
        # Only a memory-forced native choice binds the runner: otherwise its own backend decides.
        placed = "native" if instance.weights == "native" and instance.weights_note else None
        decisions.append(StartRunner(instance_id, instance.model_id, assignment, placed))
    for instance_id, status in sorted(local.items()):
        instance = state.instances.get(instance_id)
        gone = instance is None or node_id not in instance.shard_assignments or instance.status == "failed"
        if gone and status != "stopping":
            decisions.append(StopRunner(instance_id))
    return decisions
