"""A cluster member's answers to its peers' requests (hello, events, snapshot, command, model
files, link probes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from exo.core import messages as m
from exo.core.state import encode_state
from exo.node.raft_snapshots import answer_snapshot

if TYPE_CHECKING:
    from exo.node.cluster import ClusterMember

FETCH_LIMIT = 10_000


async def answer_request(member: ClusterMember, request: m.Request, peer_host: str) -> m.Reply:
    match request:
        case m.HelloRequested():
            if request.node_id != member.node_id:
                member.bus.add_peer(f"{request.bus_host or peer_host}:{request.bus_port}")
            return m.HelloAnswered(
                node_id=member.node_id,
                pub_port=member.bus.pub_port,
                term=member.term,
                master_node_id=member.leader_id,
            )
        case m.EventsRequested():
            first = await member.replica.store.first_index()
            limit = max(1, min(request.limit, FETCH_LIMIT))
            events = await member.replica.read(request.since + 1, limit=limit)
            return m.EventsAnswered(events, member.replica.last_index, first)
        case m.SnapshotRequested(index=index) if index is not None:
            return await answer_snapshot(member.replica.store, index)
        case m.SnapshotRequested():
            state = member.replica.state
            return m.SnapshotAnswered(state.last_event_index, encode_state(state))
        case m.CommandRequested():
            if member.master is None:
                return m.RequestFailed(f"not the master; ask {member.leader_id}")
            return await member.execute(request.command)
        case m.FileChunkRequested():
            if member.serve_file_chunk is None:
                return m.RequestFailed("this node serves no model files")
            return await member.serve_file_chunk(request)
        case m.HubModelRequested():
            if member.serve_hub_model is None:
                return m.RequestFailed("this node knows no Hub models")
            return await member.serve_hub_model(request)
        case m.LinkProbed():
            return m.LinkProbeAnswered(len(request.payload))
