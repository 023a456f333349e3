"""The cluster member: bus handlers, liveness, Raft (exo/node/raft_member.py) and master duties.

It wires the sans-IO cores (Raft, Liveness, Sequencer, membership_events, decide) to the bus and the
store. No inference and no HTTP here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from exo.bus.transport import Bus
from exo.core import messages as m
from exo.core.events import Event, IndexedEvent, NodeJoined
from exo.core.models import ModelFootprint
from exo.core.raft_messages import (
    EntriesAcknowledged,
    EntriesSent,
    SnapshotOffered,
    VoteAnswered,
    VoteRequested,
)
from exo.core.state import State
from exo.node.cluster_requests import answer_request
from exo.node.disk_faults import DiskFaults
from exo.node.master import Master, NotLeading
from exo.node.raft_member import RaftMember
from exo.node.replica import Replica
from exo.roles.bootstrap import should_bootstrap, should_take_over
from exo.roles.commands import decide, replacement_events
from exo.roles.liveness import HEARTBEAT_INTERVAL, Liveness
from exo.roles.membership import foreign_nodes, membership_events
from exo.roles.outbox import Outbox
from exo.roles.raft import MembershipChangePending, RaftTimings, RoleChanged, voters_after
from exo.roles.sequencer import Sequencer

logger = logging.getLogger(__name__)

# A node is marked gone (its instances fail and are re-placed) after this many liveness windows of
# silence.
NODE_GONE_WINDOWS = 2
COMMAND_COMMIT_SECONDS = 5.0
START_COMMIT_SECONDS = 5.0


@dataclass
class ClusterCounters:
    forced_campaigns: int = 0
    extra: dict[str, int] = field(default_factory=dict[str, int])


class ClusterMember:
    def __init__(
        self,
        node_id: str,
        bus: Bus,
        replica: Replica,
        term_path: Path,
        *,
        force_master: bool = False,
        interval: float = HEARTBEAT_INTERVAL,
        timings: RaftTimings | None = None,
        local_models: Callable[[], list[str]] = list,
        footprint_of: Callable[[str], ModelFootprint | None] = lambda _model_id: None,
        serve_file_chunk: Callable[[m.FileChunkRequested], Awaitable[m.Reply]] | None = None,
        serve_hub_model: Callable[[m.HubModelRequested], Awaitable[m.Reply]] | None = None,
    ) -> None:
        """`local_models`: the models this node can serve (announced in heartbeats). `footprint_of`:
        a model's memory needs, for the master re-placing instances that lost a stage.
        `serve_file_chunk` / `serve_hub_model` answer peers' requests for model file bytes and Hub
        model descriptions (none: refused). `force_master`: this node bootstraps a new cluster and
        takes the lead by a normal election once its log is up to date (docs/architecture.md)."""
        self.node_id = node_id
        self.bus = bus
        self.replica = replica
        self.force_master = force_master
        self.interval = interval
        self.liveness = Liveness(interval=interval)
        self.heartbeats: dict[str, m.Heartbeat] = {}
        self.master: Master | None = None
        self.disk_faults = DiskFaults()
        self.outbox = Outbox(node_id)
        self.raft = RaftMember(
            node_id,
            bus,
            replica,
            term_path,
            self.disk_faults,
            on_applied=self._on_applied,
            on_role=self._on_role,
            timings=timings,
        )
        self._started_at = time.monotonic()
        self._prepared = False
        self._master_since = 0.0
        self._membership_pending: asyncio.Future[int] | None = None  # until applied or refused
        self._foreign_warned: set[str] = set()  # nodes of another cluster, warned about once
        self._forced_campaign_at = 0.0
        self._tasks: list[asyncio.Task[Any]] = []
        self.counters = ClusterCounters()
        self.local_models = local_models
        self.footprint_of = footprint_of
        self.serve_file_chunk = serve_file_chunk
        self.serve_hub_model = serve_hub_model
        self.hostname = socket.gethostname()
        bus.on_topic(m.TOPIC_CONNECTION, self._on_heartbeat)
        bus.on_topic(m.TOPIC_ELECTION, self._on_raft_message)
        bus.on_topic(m.TOPIC_LOCAL_EVENTS, self._on_local_events)
        bus.on_topic(m.TOPIC_COMMANDS, self._on_command)
        bus.on_request(lambda request, peer_host: answer_request(self, request, peer_host))

    # --- lifecycle -----------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Start Raft's disk task. A node that is its own majority leads at once (no election
        timeout) and commits what a kill -9 left uncommitted on disk, so the node's worker and API
        start from the state it had."""
        if self._prepared:
            return
        self._prepared = True
        self.raft.start()
        core = self.raft.core
        if core.voters == {self.node_id}:
            self.raft.handle(core.campaign_now())
            target = core.last_index
            await self.replica.wait_for(lambda state: state.last_event_index >= target, START_COMMIT_SECONDS)

    async def start(self) -> None:
        await self.prepare()
        self._started_at = time.monotonic()  # the bootstrap window counts from here
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="cluster-tick"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.master is not None:
            await self.master.stop()
        await self.raft.close()

    def queue_depths(self) -> dict[str, int]:
        depths = {"disk": self.raft.disk_backlog, "pending_local_events": len(self.outbox)}
        if self.master is not None:
            depths["master_incoming"] = self.master.queue_depth
        return depths

    @property
    def is_master(self) -> bool:
        return self.master is not None

    @property
    def leader_id(self) -> str | None:
        return self.raft.core.leader_id

    @property
    def term(self) -> int:
        return self.raft.core.term

    @property
    def role(self) -> str:
        return self.raft.core.role

    @property
    def state(self) -> State:
        return self.replica.state

    def has_quorum(self) -> bool:
        """A master: a majority of the voters heard within an election timeout; any other node: a
        master heard within one (exo/roles/raft.py `has_quorum`)."""
        return self.raft.core.has_quorum(time.monotonic())

    # --- local events --------------------------------------------------------------------------

    def submit(self, events: Sequence[Event]) -> None:
        """Hand events to the master for sequencing; resent until seen applied."""
        self._send_local(self.outbox.add(events, time.monotonic()))

    def _send_local(self, batches: list[list[m.LocalEvent]]) -> None:
        for batch in batches:
            if self.master is not None:
                self.master.submit_local(self.node_id, batch)
            else:
                self.bus.publish(m.TOPIC_LOCAL_EVENTS, m.LocalEventsSent(self.node_id, batch))

    # --- tick ----------------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        last_heartbeat = 0.0
        step = min(self.interval, self.raft.core.timings.heartbeat_interval) / 2
        while True:
            now = time.monotonic()
            for node_id in self.liveness.expire(now):
                logger.info("no frame from %s for %.1fs", node_id, self.liveness.timeout)
            self.raft.tick(now, self.disk_faults.abstaining(now))
            self._maybe_bootstrap(now)
            self._maybe_take_over(now)
            if now - last_heartbeat >= self.interval:
                last_heartbeat = now
                self.bus.publish(m.TOPIC_CONNECTION, self._heartbeat(self.leader_id, known_peers=True))
                self._reconnect_silent_peers(self.liveness.alive(now))
            if self.master is not None:
                self._master_duties(now)
            if self.leader_id is not None:
                self._send_local(self.outbox.stale(now))
            await asyncio.sleep(step)

    def _heartbeat(self, leader_id: str | None, known_peers: bool = False) -> m.Heartbeat:
        memory = psutil.virtual_memory()
        core = self.raft.core
        return m.Heartbeat(
            node_id=self.node_id,
            term=core.term,
            master_node_id=leader_id,
            rank=m.Rank(self.force_master, core.last_index, self.node_id),
            bus_port=self.bus.bus_port,
            memory_total_bytes=memory.total,
            memory_available_bytes=memory.available,
            hostname=self.hostname,
            known_peers=self.bus.known_addresses() if known_peers else [],
            models=self.local_models() if known_peers else [],
            master_term=core.term if leader_id is not None else 0,
            quorum=self.has_quorum(),
        )

    def _maybe_bootstrap(self, now: float) -> None:
        """An empty-log node forms a cluster only when none is heard (exo/roles/bootstrap.py)."""
        core = self.raft.core
        if core.bootstrap is not None or core.voters or core.last_index > 0:
            return
        if now - self._started_at < self.liveness.timeout:
            return
        alive = self.liveness.alive(now)
        peers = [heartbeat for node_id, heartbeat in self.heartbeats.items() if node_id in alive]
        if not should_bootstrap(self.node_id, self.force_master, peers):
            return
        own = self._heartbeat(self.node_id)
        logger.info("no cluster heard: %s starts one", self.node_id)
        address = self._address_of(self.node_id) or ""
        memory = (own.memory_total_bytes, own.memory_available_bytes)
        core.bootstrap = NodeJoined(self.node_id, address, *memory, hostname=self.hostname)
        self.raft.handle(core.campaign_now())

    def _maybe_take_over(self, now: float) -> None:
        """`--force-master`: a forced voter up to date with its master runs an election at once."""
        core = self.raft.core
        if not self.force_master or core.role == "leader" or core.leader_id is None or self.raft.stalled:
            return
        if now - self._forced_campaign_at < 2 * core.timings.election_timeout:
            return
        if should_take_over(core.durable_index, self.heartbeats.get(core.leader_id), self.raft.leader_commit):
            self._forced_campaign_at = now
            self.counters.forced_campaigns += 1
            self.raft.handle(core.campaign_now())

    def _reconnect_silent_peers(self, alive: set[str]) -> None:
        for address, peer in list(self.bus.peers.items()):
            if peer.node_id is None or peer.node_id not in alive:
                self.bus.add_peer(address)

    def _master_duties(self, now: float) -> None:
        assert self.master is not None
        if self._membership_pending is not None and not self._membership_pending.done():
            return  # the previous membership events are not applied yet: none is emitted twice
        alive = self.liveness.alive(now)
        heartbeats = {**self.heartbeats, self.node_id: self._heartbeat(self.node_id)}
        addresses = {node_id: address for node_id in heartbeats if (address := self._address_of(node_id))}
        recently_heard = self.liveness.heard_within(now, self.liveness.timeout * NODE_GONE_WINDOWS)
        foreign = foreign_nodes(self.state, heartbeats, alive, self.raft.core.voters)
        self._warn_foreign(foreign)
        events = membership_events(
            self.state,
            heartbeats,
            alive | {self.node_id},
            now - self._master_since > self.liveness.timeout,
            addresses,
            recently_heard=recently_heard | {self.node_id},
            voters=self.raft.core.voters,
            foreign=foreign,
        )
        events = self._one_voter_change(events)
        if not events:
            events = replacement_events(
                self.state, self._nodes_with_model(), self.footprint_of, lambda: f"i-{secrets.token_hex(4)}"
            )
        if events:
            self._membership_pending = self.master.submit_own(events)
            self._membership_pending.add_done_callback(_ignore_outcome)

    def _warn_foreign(self, foreign: set[str]) -> None:
        for node_id in sorted(foreign - self._foreign_warned):
            logger.warning(
                "node %s keeps another cluster's event log; it is not added to this one. To join it, "
                "stop it, remove its events.db and term file (its data dir), and start it again",
                node_id,
            )
        self._foreign_warned |= foreign

    def _one_voter_change(self, events: list[Event]) -> list[Event]:
        """Raft changes the voters one at a time: keep the first change, and only when none is pending."""
        core = self.raft.core
        voters = core.voters
        kept: list[Event] = []
        for event in events:
            if voters_after(voters, event) != voters:
                if not core.membership_change_allowed or voters != core.voters:
                    continue
                voters = voters_after(voters, event)
            kept.append(event)
        return kept

    def _address_of(self, node_id: str) -> str | None:
        if node_id == self.node_id:
            return self.bus.self_address or f"{self.hostname}:{self.bus.bus_port}"
        return self.bus.address_of(node_id)

    # --- Raft's outputs ------------------------------------------------------------------------

    def _on_applied(self, entries: Sequence[IndexedEvent]) -> None:
        self.outbox.applied(entries, time.monotonic(), self.replica.state.instances)
        if self.master is not None:
            self.master.applied(self.replica.last_index)
            # Committed, so final: observers on `global_events` never see an event later replaced.
            self.bus.publish(m.TOPIC_GLOBAL_EVENTS, m.EventsPublished(self.term, self.node_id, list(entries)))

    def _on_role(self, change: RoleChanged) -> None:
        if change.role == "leader":
            logger.info("elected master for term %d", change.term)
            self._start_master(change.term)
        elif self.master is not None:
            logger.info("stepping down in term %d (master: %s)", change.term, change.leader_id)
            master, self.master = self.master, None
            master.cancel()  # before its task runs again: only a leader proposes
            self._spawn(master.stop())
        if change.leader_id is not None:
            self._send_local(self.outbox.everything(time.monotonic()))

    def _start_master(self, term: int) -> None:
        core = self.raft.core
        state = self.replica.state
        sequencer = Sequencer(
            self.node_id, term, core.last_index, self.replica.high_water.copy(), state.instances
        )
        # The uncommitted tail will be committed: its origins' events and instances count already.
        sequencer.observe_log(core.entries(self.replica.last_index + 1, core.last_index))
        self.master = Master(sequencer, self.raft.propose, self.raft.room)
        self.master.last_proposed = core.last_index
        self._master_since = time.monotonic()
        self._membership_pending = None
        self.master.start()

    # --- handlers ------------------------------------------------------------------------------

    def _on_heartbeat(self, heartbeat: m.Heartbeat) -> None:
        if heartbeat.node_id == self.node_id:
            return
        self.liveness.heard(heartbeat.node_id, time.monotonic())
        self.heartbeats[heartbeat.node_id] = heartbeat
        for address in heartbeat.known_peers:
            if address not in self.bus.peers:
                self.bus.add_peer(address)

    def _on_raft_message(self, message: m.ElectionMessage) -> None:
        match message:
            case VoteRequested(candidate_id=sender) | VoteAnswered(voter_id=sender):
                pass
            case EntriesSent(leader_id=sender) | EntriesAcknowledged(node_id=sender):
                pass
            case SnapshotOffered(leader_id=sender):
                pass
        if sender != self.node_id:
            self.liveness.heard(sender, time.monotonic())
        self.raft.receive(message)

    def _spawn(self, coroutine: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.append(task)  # type: ignore[arg-type]
        task.add_done_callback(self._tasks_done)

    def _tasks_done(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("cluster task failed", exc_info=task.exception())

    def _on_local_events(self, message: m.LocalEventsSent) -> None:
        self.liveness.heard(message.node_id, time.monotonic())
        if self.master is not None:
            self.master.submit_local(message.node_id, message.events)

    def _on_command(self, command: m.Command) -> None:
        if self.master is not None:
            self._spawn(self.execute(command))

    async def execute(self, command: m.Command) -> m.CommandAnswered:
        """Decide and propose a command (master only); answered once a majority committed it and
        this node applied it. `RemoveNode` on a node that sees no quorum is the operator's
        override (`Raft.force_remove`): the majority is gone for good."""
        answering = self.liveness.alive(time.monotonic()) | {self.node_id}
        if self.master is None and isinstance(command, m.RemoveNode) and not self.has_quorum():
            return await self._force_remove(command, answering)
        master = self.master
        if master is None:
            return m.CommandAnswered(m.Refused("not_master", "not the master"))
        outcome = decide(
            command, self.state, self._nodes_with_model(), f"i-{secrets.token_hex(4)}", answering
        )
        try:
            async with asyncio.timeout(COMMAND_COMMIT_SECONDS):
                await master.submit_own(outcome.events)
        except NotLeading as error:
            return m.CommandAnswered(m.Refused("not_master", f"not committed: {error}"))
        except MembershipChangePending as error:
            return m.CommandAnswered(m.Refused("not_committed", f"not committed: {error}"))
        except (TimeoutError, OverflowError) as error:
            return m.CommandAnswered(m.Refused("not_committed", f"not committed: {error!r}"))
        return m.CommandAnswered(outcome.answer)

    async def _force_remove(self, command: m.RemoveNode, answering: set[str]) -> m.CommandAnswered:
        outcome = decide(command, self.state, {}, "", answering)
        if not isinstance(outcome.answer, m.Removed):
            return m.CommandAnswered(outcome.answer)
        logger.warning("no quorum: removing %s by the operator's override", command.node_id)
        self.raft.handle(self.raft.core.force_remove(command.node_id))
        node_id = command.node_id
        if not await self.replica.wait_for(lambda state: node_id not in state.nodes, COMMAND_COMMIT_SECONDS):
            return m.CommandAnswered(m.Refused("not_committed", "the removal was not committed in time"))
        return m.CommandAnswered(outcome.answer)

    def _nodes_with_model(self) -> dict[str, set[str]]:
        holders: dict[str, set[str]] = {}
        for model_id in self.local_models():
            holders.setdefault(model_id, set()).add(self.node_id)
        alive = self.liveness.alive(time.monotonic())
        for node_id, heartbeat in self.heartbeats.items():
            if node_id in alive:
                for model_id in heartbeat.models:
                    holders.setdefault(model_id, set()).add(node_id)
        return holders


def _ignore_outcome(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a membership proposal that failed is proposed again later
