"""Wire messages: one closed union per topic and one for request/reply.

Every frame is msgpack of one of these Structs. Decoding validates the shape; a frame that fails
is dropped and counted by the receiving socket's shell, never raised into the node.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from exo.core.events import Event, IndexedEvent, Sharding
from exo.core.models import ModelFootprint
from exo.core.raft_messages import RaftMessage


class _BusMessage(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    pass


# --- topic `global_events` (master -> all) ---------------------------------------------------


class EventsPublished(_BusMessage, frozen=True):
    """Committed events, published by the master as they are applied: final, never replaced. Raft's
    `EntriesSent` (topic `election`) replicates the log; this topic is for observers (no node
    needs it to keep its own log)."""

    term: int
    master_node_id: str
    events: list[IndexedEvent]


GlobalEventsMessage = EventsPublished


# --- topic `local_events` (node -> master) ----------------------------------------------------


class LocalEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    sequence: int
    event: Event


class LocalEventsSent(_BusMessage, frozen=True):
    node_id: str
    events: list[LocalEvent]


LocalEventsMessage = LocalEventsSent


# --- topic `election` ---------------------------------------------------------------------------


class Rank(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True, order=True):
    """A node's standing, as heartbeats report it: `--force-master`, the last index of its log."""

    force_master: bool
    last_index: int
    node_id: str


# Raft's messages (exo/core/raft_messages.py); each names its addressee.
ElectionMessage = RaftMessage


# --- topic `connection` -----------------------------------------------------------------------


class Heartbeat(_BusMessage, frozen=True):
    """`term`: the highest term the sender has seen; `master_term`: the term of the master it follows
    (its own, for a master). `quorum`: a master's claim that it reaches a majority of the known nodes."""

    node_id: str
    term: int
    master_node_id: str | None
    rank: Rank
    bus_port: int
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    hostname: str = ""
    known_peers: list[str] = []
    models: list[str] = []
    master_term: int = 0
    quorum: bool = False


ConnectionMessage = Heartbeat


# --- topic `downloads` (every node -> all; live figures, never logged) --------------------------


class DownloadProgressed(_BusMessage, frozen=True):
    """The sender's latest figures for one model's download (a last-value update: a lost one is
    replaced by the next, sent at most a few times a second). `files`: path -> (done, total)."""

    node_id: str
    model_id: str
    status: str
    bytes_done: int
    bytes_total: int
    files: dict[str, tuple[int, int]] = {}
    reason: str | None = None


DownloadsMessage = DownloadProgressed


# --- topic `commands` (any -> master, fire and forget; answered ones go over request/reply) ---


class PlaceInstance(_BusMessage, frozen=True):
    """`footprint` comes from the asking node's copy of the model (or the Hub's metadata): the
    master may not have it. `download`: a Hub model the chosen nodes may fetch (holders first)."""

    model_id: str
    footprint: ModelFootprint
    sharding: Sharding = "Pipeline"
    min_nodes: int = 1
    download: bool = False


class DeleteInstance(_BusMessage, frozen=True):
    instance_id: str


class LabelNode(_BusMessage, frozen=True):
    node_id: str
    key: str
    value: str


class RemoveNode(_BusMessage, frozen=True):
    """An operator's `exo cluster remove NODE`: the node leaves the members for good (refused while
    it answers), so a two-node cluster that lost one can make cluster changes again."""

    node_id: str


Command = PlaceInstance | DeleteInstance | LabelNode | RemoveNode


# --- request / reply (DEALER -> ROUTER on the bus port) --------------------------------------


class HelloRequested(_BusMessage, frozen=True):
    """`bus_host` empty: the answering node uses the address the request came from."""

    node_id: str
    bus_port: int
    bus_host: str = ""


class HelloAnswered(_BusMessage, frozen=True):
    """Ports are on the host the asker connected to: it alone knows which address reached us."""

    node_id: str
    pub_port: int
    term: int
    master_node_id: str | None


class EventsRequested(_BusMessage, frozen=True):
    """Events with index > `since`, at most `limit` of them."""

    since: int
    limit: int = 10_000


class EventsAnswered(_BusMessage, frozen=True):
    events: list[IndexedEvent]
    last_index: int
    first_index: int


class SnapshotRequested(_BusMessage, frozen=True):
    """`index`: the snapshot a master offered (`SnapshotOffered`), answered exactly or refused;
    None: the node's current state."""

    index: int | None = None


class SnapshotAnswered(_BusMessage, frozen=True):
    index: int
    state: bytes


class CommandRequested(_BusMessage, frozen=True):
    command: Command


class LinkProbed(_BusMessage, frozen=True):
    """A round trip to measure the link (exo/node/link_probe.py); `payload` is filler whose size
    over the extra time it takes gives the bandwidth."""

    payload: bytes = b""


class LinkProbeAnswered(_BusMessage, frozen=True):
    payload_bytes: int


# Why the master refused a command: a closed set, so the asking side decides what each means to its
# user (only the API turns them into HTTP status codes).
RefusalReason = Literal[
    "instance_not_found",  # DeleteInstance of an instance the log does not hold
    "node_not_found",  # LabelNode / RemoveNode of a node the log does not hold
    "node_answers",  # RemoveNode of a node the master still hears
    "model_not_held",  # PlaceInstance: no alive node has the model in its models dir
    "does_not_fit",  # PlaceInstance: the alive nodes that have it lack the memory
    "not_master",  # the asked node is not (or no longer) the master
    "not_committed",  # the master could not commit the command's events in time
]


class Placed(_BusMessage, frozen=True):
    instance_id: str


class Deleted(_BusMessage, frozen=True):
    instance_id: str


class Labelled(_BusMessage, frozen=True):
    node_id: str


class Removed(_BusMessage, frozen=True):
    node_id: str


class Refused(_BusMessage, frozen=True):
    """`detail`: the master's words for a person (placement's reasons, the failed commit)."""

    reason: RefusalReason
    detail: str = ""


CommandAnswer = Placed | Deleted | Labelled | Removed | Refused


class CommandAnswered(_BusMessage, frozen=True):
    answer: CommandAnswer


class RequestFailed(_BusMessage, frozen=True):
    reason: str


class FileChunkRequested(_BusMessage, frozen=True):
    """Bytes `[offset, offset + length)` of a model file a peer holds verified, at this commit
    (one download per cluster: peers fetch from each other before the Hub)."""

    repo_id: str
    commit: str
    path: str
    offset: int
    length: int


class FileChunkAnswered(_BusMessage, frozen=True):
    offset: int
    size: int  # the whole file's
    data: bytes


class HubModelRequested(_BusMessage, frozen=True):
    """What a peer knows of a Hub model (its files, sha256, tensor sizes), so a node placed on it
    need not ask the Hub again."""

    model_id: str


class HubModelAnswered(_BusMessage, frozen=True):
    model: bytes  # JSON of exo.inference.manifest.HubModel (the bus does not know that type)


Request = (
    HelloRequested
    | EventsRequested
    | SnapshotRequested
    | CommandRequested
    | FileChunkRequested
    | HubModelRequested
    | LinkProbed
)
Reply = (
    HelloAnswered
    | EventsAnswered
    | SnapshotAnswered
    | CommandAnswered
    | RequestFailed
    | FileChunkAnswered
    | HubModelAnswered
    | LinkProbeAnswered
)


class RequestEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    request_id: int
    body: Request


class ReplyEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    request_id: int
    body: Reply


TOPIC_GLOBAL_EVENTS: Final = b"global_events"
TOPIC_LOCAL_EVENTS: Final = b"local_events"
TOPIC_COMMANDS: Final = b"commands"
TOPIC_ELECTION: Final = b"election"
TOPIC_CONNECTION: Final = b"connection"
TOPIC_DOWNLOADS: Final = b"downloads"

TOPIC_TYPES: Final[dict[bytes, object]] = {
    TOPIC_GLOBAL_EVENTS: GlobalEventsMessage,
    TOPIC_LOCAL_EVENTS: LocalEventsMessage,
    TOPIC_COMMANDS: Command,
    TOPIC_ELECTION: ElectionMessage,
    TOPIC_CONNECTION: ConnectionMessage,
    TOPIC_DOWNLOADS: DownloadsMessage,
}
