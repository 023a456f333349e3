"""Membership policy, sans-IO: which node events the master's view of liveness implies."""

from __future__ import annotations

from exo.core.events import Event, NodeJoined, NodeMemoryMeasured, NodeTimedOut
from exo.core.messages import Heartbeat
from exo.core.state import State

# Memory is re-announced in the log only when it moved by more than this share of the total.
MEMORY_CHANGE_SHARE = 0.10


def membership_events(
    state: State,
    heartbeats: dict[str, Heartbeat],
    alive: set[str],
    may_time_out: bool,
    node_addresses: dict[str, str],
    *,
    recently_heard: set[str] | None = None,
    voters: frozenset[str] = frozenset(),
    foreign: set[str] | None = None,
) -> list[Event]:
    """Node events that the master's view of liveness implies for the current state.

    `may_time_out` is False for the first liveness window after taking office, so the new master
    has heard everyone before declaring anyone gone. `recently_heard` (default: `alive`) are nodes
    heard within the longer window that being marked gone needs: a gone node's instances fail and
    are re-placed, which is costly to do for a node that was only slow for a moment. A node that
    keeps another cluster's log (`foreign_nodes`) is never added: its history cannot be merged.
    """
    recently_heard = alive if recently_heard is None else recently_heard
    events: list[Event] = []
    if foreign is None:  # the caller may have computed it already (to warn about it)
        foreign = foreign_nodes(state, heartbeats, alive, voters)
    for node_id in sorted(alive - foreign):
        heartbeat = heartbeats.get(node_id)
        if heartbeat is None:
            continue
        known = state.nodes.get(node_id)
        if known is None or known.status == "gone":
            events.append(
                NodeJoined(
                    node_id=node_id,
                    bus_address=node_addresses.get(node_id, ""),
                    memory_total_bytes=heartbeat.memory_total_bytes,
                    memory_available_bytes=heartbeat.memory_available_bytes,
                    hostname=heartbeat.hostname,
                )
            )
        elif (
            abs(known.memory_available_bytes - heartbeat.memory_available_bytes)
            > MEMORY_CHANGE_SHARE * max(heartbeat.memory_total_bytes, 1)
            or known.memory_total_bytes != heartbeat.memory_total_bytes
        ):
            events.append(
                NodeMemoryMeasured(node_id, heartbeat.memory_total_bytes, heartbeat.memory_available_bytes)
            )
    if may_time_out:
        for node_id, node in sorted(state.nodes.items()):
            if node.status == "alive" and node_id not in alive and node_id not in recently_heard:
                events.append(NodeTimedOut(node_id))
    return events


def foreign_nodes(
    state: State, heartbeats: dict[str, Heartbeat], alive: set[str], voters: frozenset[str]
) -> set[str]:
    """Nodes heard that hold a log of their own but were never members here: each bootstrapped
    another cluster (two empty nodes that did not hear each other at start). Raft cannot merge two
    committed histories, so such a node stays out until its log is removed (as etcd refuses a member
    of another cluster)."""
    return {
        node_id
        for node_id in alive
        if (heartbeat := heartbeats.get(node_id)) is not None
        and heartbeat.rank.last_index > 0
        and node_id not in state.nodes
        and node_id not in voters
    }
