"""The cluster's events: one closed union, one frozen Struct per event, past-tense names.

Events describe cluster state changes only (nodes, masters, instances, runners). Tokens and
activations never go through the log.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Sharding = Literal["Pipeline", "Tensor"]
# "downloading": the stage's node is fetching the model files it lacks (then "loading").
RunnerStatus = Literal["downloading", "loading", "ready", "failed", "stopped"]
# What kind of failure a "failed" runner reports, where a rule acts on it: "tensor_stall" is a
# tensor rank whose pass outlived its bound (a peer rank froze in a collective) and that cut its
# ring; the master re-places such an instance, as one whose node went away, since its nodes are
# alive and the frozen runner is killed when the old instance is deleted.
RunnerFailure = Literal["tensor_stall"]


class _Event(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    pass


class ShardAssignment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A contiguous block of layers `[start_layer, end_layer)` of a model with `n_layers` layers.

    In a tensor instance every node holds all layers, 1/`size` of each, as rank `rank` of the
    instance's group (a pipeline stage is rank 0 of 1: logs written before tensor instances decode so).
    """

    start_layer: int
    end_layer: int
    n_layers: int
    rank: int = 0
    size: int = 1


class MasterElected(_Event, frozen=True):
    term: int
    node_id: str


class NodeJoined(_Event, frozen=True):
    """A node was seen (first time, or back after being marked gone)."""

    node_id: str
    bus_address: str
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    hostname: str = ""


class NodeTimedOut(_Event, frozen=True):
    """The master heard nothing from a node for the liveness window: it is marked `gone`."""

    node_id: str


class NodeRemoved(_Event, frozen=True):
    """The node left the cluster's voting members (gone longer than the removal time, or an
    operator's `exo cluster remove`): it no longer counts towards a majority."""

    node_id: str


class NodeMemoryMeasured(_Event, frozen=True):
    node_id: str
    memory_total_bytes: int
    memory_available_bytes: int


class NodeLabelled(_Event, frozen=True):
    """An operator (or a benchmark) attached a key/value label to a node."""

    node_id: str
    key: str
    value: str


class InstanceCreated(_Event, frozen=True):
    instance_id: str
    model_id: str
    sharding: Sharding
    shard_assignments: dict[str, ShardAssignment]
    # What the user asked for: a re-placement after a node is gone keeps it while enough nodes remain.
    # Logs written before it existed decode with 1, what their placements used.
    min_nodes: int = 1
    # The representation placement sized the stages for ("float32" or "native"; None: not said),
    # and why the native one was kept when `--weights-dtype auto` found too little memory ("" else).
    weights: Literal["float32", "native"] | None = None
    weights_note: str = ""


class InstanceDeleted(_Event, frozen=True):
    instance_id: str


class RunnerStatusUpdated(_Event, frozen=True):
    """`activation_address` is where a `ready` runner's stage takes pipeline frames;
    `ring_address` (HOST:PORT) where a tensor rank's runner listens for its group's ring."""

    instance_id: str
    node_id: str
    status: RunnerStatus
    reason: str | None = None
    activation_address: str | None = None
    ring_address: str | None = None
    failure: RunnerFailure | None = None  # with "failed": a kind a rule acts on (None: any other)


class ModelDownloadRequested(_Event, frozen=True):
    """Someone asked `node_id` to fetch the whole model (`POST /models/download`); the node does."""

    node_id: str
    model_id: str


class ModelRemovalRequested(_Event, frozen=True):
    """Someone asked `node_id` to delete the model's files (`DELETE /models/{id}`); the node does
    and answers with a `ModelRemoved` of the same `request_id`."""

    node_id: str
    model_id: str
    request_id: str = ""


class ModelDownloadStarted(_Event, frozen=True):
    """A node began fetching files of a model (bytes in flight are live figures, not events).
    `whole`: all of it (a request to fetch the model), else what one of its stages needs.
    `files`: the paths it lacks and fetches (empty in logs written before it was added); the node
    that started first fetches a file the others also lack from the Hub, they copy it from it."""

    node_id: str
    model_id: str
    bytes_total: int
    whole: bool = True
    files: list[str] = []


class ModelDownloadFinished(_Event, frozen=True):
    """A node holds, verified, the files of the model it fetched (all, or its stage's)."""

    node_id: str
    model_id: str
    bytes_total: int
    whole: bool = True


class ModelDownloadFailed(_Event, frozen=True):
    node_id: str
    model_id: str
    reason: str


class ModelRemoved(_Event, frozen=True):
    """A node deleted a model's files (`had_files` False: it held none)."""

    node_id: str
    model_id: str
    had_files: bool = True
    request_id: str = ""


Event = (
    MasterElected
    | NodeJoined
    | NodeTimedOut
    | NodeRemoved
    | NodeMemoryMeasured
    | NodeLabelled
    | InstanceCreated
    | InstanceDeleted
    | RunnerStatusUpdated
    | ModelDownloadRequested
    | ModelRemovalRequested
    | ModelDownloadStarted
    | ModelDownloadFinished
    | ModelDownloadFailed
    | ModelRemoved
)


class IndexedEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """An event as the master sequenced it: its place in the log and the term that placed it.

    `origin_node_id`/`origin_sequence` identify the local event it came from, so a node can tell
    when its own event was applied and the master can drop a resent duplicate.
    """

    index: int
    term: int
    origin_node_id: str
    origin_sequence: int
    event: Event


event_encoder = msgspec.msgpack.Encoder()
indexed_event_decoder = msgspec.msgpack.Decoder(IndexedEvent)
event_decoder = msgspec.msgpack.Decoder(Event)


def encode_event(event: Event) -> bytes:
    return event_encoder.encode(event)


def decode_event(data: bytes) -> Event:
    return event_decoder.decode(data)


def event_type_name(event: Event) -> str:
    return type(event).__name__
