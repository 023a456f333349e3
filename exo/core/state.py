"""The cluster state and the pure `apply` that folds indexed events into it.

`apply` has no clock, no I/O and no logging: the state is a function of the log alone, which is
what lets `exo-replay` rebuild on any node exactly what that node served.
"""

from __future__ import annotations

from typing import Literal, assert_never

import msgspec
from msgspec.structs import replace

from exo.core.events import (
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    MasterElected,
    ModelDownloadFailed,
    ModelDownloadFinished,
    ModelDownloadRequested,
    ModelDownloadStarted,
    ModelRemovalRequested,
    ModelRemoved,
    NodeJoined,
    NodeLabelled,
    NodeMemoryMeasured,
    NodeRemoved,
    NodeTimedOut,
    RunnerFailure,
    RunnerStatus,
    RunnerStatusUpdated,
    ShardAssignment,
    Sharding,
)

NodeStatus = Literal["alive", "gone"]
InstanceStatus = Literal["placing", "downloading", "loading", "ready", "failed"]
DownloadStatus = Literal["requested", "downloading", "ready", "failed", "removing", "removed"]


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
    ring_address: str | None = None  # a tensor rank's ring listener, HOST:PORT
    failure: RunnerFailure | None = None  # the kind of a "failed" runner's failure, where typed


class Instance(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    instance_id: str
    model_id: str
    sharding: Sharding
    status: InstanceStatus
    shard_assignments: dict[str, ShardAssignment]
    runners: dict[str, RunnerInfo] = {}
    failure_reason: str | None = None
    min_nodes: int = 1  # as placed; kept by re-placement while enough nodes remain
    weights: Literal["float32", "native"] | None = None  # as InstanceCreated
    weights_note: str = ""

    def stage_order(self) -> list[str]:
        """Node ids in pipeline order (by first layer), a tensor instance's by rank."""
        return sorted(
            self.shard_assignments,
            key=lambda node_id: (
                self.shard_assignments[node_id].start_layer,
                self.shard_assignments[node_id].rank,
            ),
        )

    def ring_hosts(self) -> list[str] | None:
        """A tensor instance's ring addresses by rank, once every rank's runner has said its own."""
        hosts: list[str] = []
        for node_id in self.stage_order():
            runner = self.runners.get(node_id)
            if runner is None or runner.ring_address is None or runner.status in ("failed", "stopped"):
                return None
            hosts.append(runner.ring_address)
        return hosts

    def route(self) -> list[str] | None:
        """Activation addresses of the stages in pipeline order, when every stage is ready."""
        addresses: list[str] = []
        for node_id in self.stage_order():
            runner = self.runners.get(node_id)
            if runner is None or runner.status != "ready" or runner.activation_address is None:
                return None
            addresses.append(runner.activation_address)
        # A tensor instance takes requests at rank 0 only; the other ranks get each step from it.
        return addresses[:1] if self.sharding == "Tensor" else addresses


class ModelDownload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the log says of one node's download of one model (bytes done are live figures)."""

    status: DownloadStatus
    bytes_total: int = 0
    reason: str | None = None
    whole: bool = True  # the whole model (else a stage's files)
    request_id: str = ""  # of the removal asked ("removing") or done ("removed")
    # While "downloading": the files it fetches, and the log index of the start of this download
    # (kept when a restarted node starts it again), which orders who fetches a shared file.
    files: list[str] = []
    since: int = 0


class State(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    master_node_id: str | None = None
    term: int = 0
    last_event_index: int = 0
    nodes: dict[str, NodeInfo] = {}
    instances: dict[str, Instance] = {}
    # node id -> model id -> the node's last download of it (Hub models only).
    downloads: dict[str, dict[str, ModelDownload]] = {}


def apply(state: State, indexed: IndexedEvent) -> State:
    """Fold one indexed event into the state. Indices are checked by the caller (the sequencer)."""
    builder = StateBuilder(state)
    builder.apply(indexed)
    return builder.build()


class StateBuilder:
    """Folds a run of events into a State without building a State per event.

    Copy-on-write over the start state: a dict (nodes, instances) is copied on its first change,
    then changed in place until `build`, so folding n events copies each dict once instead of n
    times, and the only State built is the last. Entries stay frozen Structs, replaced, never
    changed. `apply(state, event)` is the one-event case, so there is one set of `_apply_*` rules;
    replay and catch-up fold whole pages through one builder.
    """

    __slots__ = (
        "_own_instances",
        "_own_nodes",
        "downloads",
        "instances",
        "last_event_index",
        "master_node_id",
        "nodes",
        "term",
    )

    def __init__(self, state: State) -> None:
        self.master_node_id = state.master_node_id
        self.term = state.term
        self.last_event_index = state.last_event_index
        self.nodes = state.nodes
        self.instances = state.instances
        self.downloads = state.downloads
        # Whether this builder made the dict (and may change it in place); the start state's are shared.
        self._own_nodes = False
        self._own_instances = False

    def apply(self, indexed: IndexedEvent) -> None:
        # The cases run in the order they are tried: most frequent first (measurements, runner
        # reports and labels are nearly all of a long-lived cluster's log).
        match indexed.event:
            case NodeMemoryMeasured() as event:
                _apply_node_memory_measured(self, event)
            case RunnerStatusUpdated() as event:
                _apply_runner_status_updated(self, event)
            case NodeLabelled() as event:
                _apply_node_labelled(self, event)
            case NodeJoined() as event:
                _apply_node_joined(self, event)
            case NodeTimedOut() as event:
                _apply_node_timed_out(self, event)
            case NodeRemoved() as event:
                _apply_node_removed(self, event)
            case InstanceCreated() as event:
                _apply_instance_created(self, event)
            case InstanceDeleted() as event:
                _apply_instance_deleted(self, event)
            case MasterElected() as event:
                _apply_master_elected(self, event)
            case ModelDownloadRequested(node_id=node_id, model_id=model_id):
                self.set_download(node_id, model_id, ModelDownload("requested"))
            case ModelRemovalRequested(node_id=node_id, model_id=model_id, request_id=request_id):
                self.set_download(node_id, model_id, ModelDownload("removing", request_id=request_id))
            case ModelDownloadStarted(node_id=node_id, model_id=model_id) as event:
                self.set_download(node_id, model_id, self._download_started(event, indexed.index))
            case ModelDownloadFinished(node_id=node_id, model_id=model_id, bytes_total=total, whole=whole):
                self.set_download(node_id, model_id, ModelDownload("ready", total, whole=whole))
            case ModelDownloadFailed(node_id=node_id, model_id=model_id, reason=reason):
                self.set_download(node_id, model_id, ModelDownload("failed", reason=reason))
            case ModelRemoved(node_id=node_id, model_id=model_id, request_id=request_id):
                self.set_download(node_id, model_id, ModelDownload("removed", request_id=request_id))
            case _:
                assert_never(indexed.event)
        self.last_event_index = indexed.index

    def build(self) -> State:
        state = State(
            self.master_node_id, self.term, self.last_event_index, self.nodes, self.instances, self.downloads
        )
        # The built state now shares these dicts: the next change copies them again.
        self._own_nodes = self._own_instances = False
        return state

    def set_node(self, node: NodeInfo) -> None:
        self._writable_nodes()[node.node_id] = node

    def set_instance(self, instance: Instance) -> None:
        self._writable_instances()[instance.instance_id] = instance

    def delete_node(self, node_id: str) -> None:
        del self._writable_nodes()[node_id]

    def delete_instance(self, instance_id: str) -> None:
        del self._writable_instances()[instance_id]

    def _download_started(self, event: ModelDownloadStarted, index: int) -> ModelDownload:
        previous = self.downloads.get(event.node_id, {}).get(event.model_id)
        since = previous.since if previous is not None and previous.status == "downloading" else index
        return ModelDownload(
            "downloading", event.bytes_total, whole=event.whole, files=list(event.files), since=since or index
        )

    def set_download(self, node_id: str, model_id: str, download: ModelDownload) -> None:
        """Downloads change rarely (a few events per model): copied whole, not copy-on-write."""
        self.downloads = {**self.downloads, node_id: {**self.downloads.get(node_id, {}), model_id: download}}

    def _writable_nodes(self) -> dict[str, NodeInfo]:
        if not self._own_nodes:
            self.nodes = dict(self.nodes)
            self._own_nodes = True
        return self.nodes

    def _writable_instances(self) -> dict[str, Instance]:
        if not self._own_instances:
            self.instances = dict(self.instances)
            self._own_instances = True
        return self.instances


def _apply_master_elected(builder: StateBuilder, event: MasterElected) -> None:
    builder.master_node_id = event.node_id
    builder.term = max(builder.term, event.term)


def _apply_node_joined(builder: StateBuilder, event: NodeJoined) -> None:
    previous = builder.nodes.get(event.node_id)
    node = NodeInfo(
        node_id=event.node_id,
        status="alive",
        memory_total_bytes=event.memory_total_bytes,
        memory_available_bytes=event.memory_available_bytes,
        bus_address=event.bus_address,
        hostname=event.hostname,
        labels=previous.labels if previous is not None else {},
    )
    builder.set_node(node)


def _apply_node_removed(builder: StateBuilder, event: NodeRemoved) -> None:
    if event.node_id not in builder.nodes:
        return
    _apply_node_timed_out(builder, NodeTimedOut(event.node_id))
    builder.delete_node(event.node_id)


def _apply_node_timed_out(builder: StateBuilder, event: NodeTimedOut) -> None:
    node = builder.nodes.get(event.node_id)
    if node is None:
        return
    builder.set_node(replace(node, status="gone"))
    # A gone node's runners are gone with it: every instance with a stage there has failed.
    for instance in list(builder.instances.values()):
        if event.node_id in instance.shard_assignments and instance.status != "failed":
            runners = {**instance.runners, event.node_id: RunnerInfo("failed", f"node {event.node_id} gone")}
            builder.set_instance(_with_runners(instance, runners))


def _apply_node_memory_measured(builder: StateBuilder, event: NodeMemoryMeasured) -> None:
    node = builder.nodes.get(event.node_id)
    if node is None:
        return
    builder.set_node(
        replace(
            node,
            memory_total_bytes=event.memory_total_bytes,
            memory_available_bytes=event.memory_available_bytes,
        )
    )


def _apply_node_labelled(builder: StateBuilder, event: NodeLabelled) -> None:
    node = builder.nodes.get(event.node_id)
    if node is None:
        return
    builder.set_node(replace(node, labels={**node.labels, event.key: event.value}))


def _apply_instance_created(builder: StateBuilder, event: InstanceCreated) -> None:
    instance = Instance(
        instance_id=event.instance_id,
        model_id=event.model_id,
        sharding=event.sharding,
        status="placing",
        shard_assignments=event.shard_assignments,
        min_nodes=event.min_nodes,
        weights=event.weights,
        weights_note=event.weights_note,
    )
    builder.set_instance(instance)


def _apply_instance_deleted(builder: StateBuilder, event: InstanceDeleted) -> None:
    if event.instance_id in builder.instances:
        builder.delete_instance(event.instance_id)


def _apply_runner_status_updated(builder: StateBuilder, event: RunnerStatusUpdated) -> None:
    instance = builder.instances.get(event.instance_id)
    if instance is None or event.node_id not in instance.shard_assignments:
        return
    runners = {**instance.runners, event.node_id: _runner_info(event)}
    if instance.status == "failed" and event.status != "failed":
        # A failed instance stays failed until it is deleted or placed again: a late "ready"
        # from a surviving stage must not resurrect a pipeline with a hole in it.
        builder.set_instance(replace(instance, runners=runners))
        return
    builder.set_instance(_with_runners(instance, runners))


def _runner_info(event: RunnerStatusUpdated) -> RunnerInfo:
    return RunnerInfo(event.status, event.reason, event.activation_address, event.ring_address, event.failure)


def _with_runners(instance: Instance, runners: dict[str, RunnerInfo]) -> Instance:
    status, reason = _instance_status(instance.shard_assignments, runners)
    if instance.status == "failed":
        status, reason = "failed", instance.failure_reason
    return replace(instance, runners=runners, status=status, failure_reason=reason)


def _instance_status(
    assignments: dict[str, ShardAssignment], runners: dict[str, RunnerInfo]
) -> tuple[InstanceStatus, str | None]:
    failed = [node_id for node_id, runner in runners.items() if runner.status in ("failed", "stopped")]
    if failed:
        # The reason names the first failed stage by node id, whatever order the reports came in.
        node_id = min(failed)
        runner = runners[node_id]
        return "failed", runner.reason or f"runner on {node_id} {runner.status}"
    if assignments and all(
        (runner := runners.get(node_id)) is not None and runner.status == "ready" for node_id in assignments
    ):
        return "ready", None
    if any(runner.status == "downloading" for runner in runners.values()):
        return "downloading", None
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
    """The JSON state document (`GET /state`, `exo-replay --json`; docs/api.md describes its keys)."""
    return msgspec.json.encode(state)
