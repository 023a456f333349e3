"""The cluster member: bus handlers, liveness, election actions, master duties and catch-up.

It wires the sans-IO cores (Liveness, Election, Sequencer, EventOrderer, membership_events) to the
bus and the store. No inference and no HTTP here.
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

from exo.bus.transport import Bus, RequestTimedOut
from exo.core import messages as m
from exo.core.events import Event, IndexedEvent, MasterElected
from exo.core.models import ModelFootprint
from exo.core.state import State, decode_state, encode_state
from exo.node.disk_faults import DiskFaults
from exo.node.master import Master
from exo.node.replica import Replica, find_common_prefix
from exo.roles.commands import decide, replacement_events
from exo.roles.election import (
    Action,
    AnnounceCampaign,
    AnnounceVictory,
    BecomeMaster,
    Election,
    FollowMaster,
    PersistTerm,
)
from exo.roles.liveness import HEARTBEAT_INTERVAL, Liveness
from exo.roles.membership import membership_events
from exo.roles.outbox import Outbox
from exo.roles.sequencer import GapRequest, Sequencer
from exo.store.restore import restore_state

logger = logging.getLogger(__name__)

FETCH_LIMIT = 10_000
# A node this far behind with nothing in its log takes a snapshot instead of the whole history.
SNAPSHOT_CATCH_UP_THRESHOLD = 10_000
APPLY_QUEUE_BATCHES = 10_000
PROMOTION_SYNC_SECONDS = 1.0
# A node is marked gone (its instances fail and are re-placed) after this many liveness windows of
# silence; the election reacts to a silent master after one.
NODE_GONE_WINDOWS = 2
COMMAND_COMMIT_SECONDS = 5.0


@dataclass
class ClusterCounters:
    stale_term_messages: int = 0
    apply_queue_full: int = 0
    fetches: int = 0
    snapshots_installed: int = 0
    events_dropped_on_reconcile: int = 0
    extra: dict[str, int] = field(default_factory=dict[str, int])


def read_term(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError as error:
        raise SystemExit(f"exo: {path} does not hold a term number; remove it to start at 0") from error


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
        local_models: Callable[[], list[str]] = list,
        footprint_of: Callable[[str], ModelFootprint | None] = lambda _model_id: None,
        serve_file_chunk: Callable[[m.FileChunkRequested], Awaitable[m.Reply]] | None = None,
        serve_hub_model: Callable[[m.HubModelRequested], Awaitable[m.Reply]] | None = None,
    ) -> None:
        """`local_models`: the models this node can serve (announced in heartbeats). `footprint_of`:
        a model's memory needs, for the master re-placing instances that lost a stage.
        `serve_file_chunk` / `serve_hub_model` answer peers' requests for model file bytes and Hub
        model descriptions (none: refused)."""
        self.node_id = node_id
        self.bus = bus
        self.replica = replica
        self.term_path = term_path
        self.interval = interval
        self.liveness = Liveness(interval=interval)
        now = time.monotonic()
        term = max(read_term(term_path), replica.state.term)
        self.election = Election(node_id, term, force_master, started_at=now, interval=interval)
        self.heartbeats: dict[str, m.Heartbeat] = {}
        self.master: Master | None = None
        self.disk_faults = DiskFaults()
        self._master_since = 0.0
        self._membership_sent_at = 0  # the index the last membership events were sequenced at
        self.outbox = Outbox(node_id)
        self._apply_queue: asyncio.Queue[list[IndexedEvent]] = asyncio.Queue(APPLY_QUEUE_BATCHES)
        self._fetch_task: asyncio.Task[bool] | None = None
        self._reconciling = False
        self._reconcile_lock = asyncio.Lock()
        self._apply_lock = asyncio.Lock()  # held while queued events from the master are applied
        self._apply_in_hand: list[IndexedEvent] | None = None  # taken from the queue, not yet applied
        self._reconciled_with: tuple[str, int] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.counters = ClusterCounters()
        self.local_models = local_models
        self.footprint_of = footprint_of
        self.serve_file_chunk = serve_file_chunk
        self.serve_hub_model = serve_hub_model
        self.hostname = socket.gethostname()
        bus.on_topic(m.TOPIC_CONNECTION, self._on_heartbeat)
        bus.on_topic(m.TOPIC_ELECTION, self._on_election)
        bus.on_topic(m.TOPIC_GLOBAL_EVENTS, self._on_global_events)
        bus.on_topic(m.TOPIC_LOCAL_EVENTS, self._on_local_events)
        bus.on_topic(m.TOPIC_COMMANDS, self._on_command)
        bus.on_request(self._on_request)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.election.restart_clock(time.monotonic())
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="cluster-tick"))
        self._tasks.append(asyncio.create_task(self._apply_loop(), name="cluster-apply"))

    async def close(self) -> None:
        if self.master is not None:
            await self.master.stop()
        if self._fetch_task is not None:
            self._fetch_task.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # A follower applies before its own write lands: what it applied is written before the store closes.
        await self.replica.close()

    def queue_depths(self) -> dict[str, int]:
        depths = {
            "apply": self._apply_queue.qsize(),
            "pending_local_events": len(self.outbox),
            "buffered_out_of_order": self.replica.orderer.buffered,
        }
        if self.master is not None:
            depths["master_incoming"] = self.master.queue_depth
        return depths

    @property
    def is_master(self) -> bool:
        return self.master is not None

    @property
    def state(self) -> State:
        return self.replica.state

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
        while True:
            now = time.monotonic()
            for node_id in self.liveness.expire(now):
                logger.info("no frame from %s for %.1fs", node_id, self.liveness.timeout)
            alive = self.liveness.alive(now)
            self.election.abstain = self.disk_faults.abstaining(now)
            await self._act(self.election.on_tick(now, self.replica.durable_index, alive))
            if now - last_heartbeat >= self.interval:
                last_heartbeat = now
                self._publish_heartbeat()
                self._reconnect_silent_peers(alive)
            if self.master is not None:
                self._master_duties(now, alive)
            else:
                self._maybe_fetch(now)
            if self.election.master_node_id is not None:
                self._send_local(self.outbox.stale(now))
            await asyncio.sleep(self.interval / 2)

    def _publish_heartbeat(self) -> None:
        memory = psutil.virtual_memory()
        self.bus.publish(
            m.TOPIC_CONNECTION,
            m.Heartbeat(
                node_id=self.node_id,
                term=self.election.term,
                master_node_id=self.election.master_node_id,
                rank=self.election.rank(self.replica.durable_index),
                bus_port=self.bus.bus_port,
                memory_total_bytes=memory.total,
                memory_available_bytes=memory.available,
                hostname=self.hostname,
                known_peers=self.bus.known_addresses(),
                models=self.local_models(),
                master_term=self.election.master_term,
                quorum=self.has_quorum(),
            ),
        )

    def has_quorum(self) -> bool:
        """Whether this node reaches a majority of the nodes the cluster has ever had (itself included)."""
        members = set(self.state.nodes) | {self.node_id}
        alive = (self.liveness.alive(time.monotonic()) | {self.node_id}) & members
        return len(alive) * 2 > len(members)

    def _reconnect_silent_peers(self, alive: set[str]) -> None:
        for address, peer in list(self.bus.peers.items()):
            if peer.node_id is None or peer.node_id not in alive:
                self.bus.add_peer(address)

    def _master_duties(self, now: float, alive: set[str]) -> None:
        assert self.master is not None
        own = self._own_heartbeat_view()
        heartbeats = {**self.heartbeats, self.node_id: own}
        addresses = {node_id: address for node_id in heartbeats if (address := self._address_of(node_id))}
        may_time_out = now - self._master_since > self.liveness.timeout
        recently_heard = self.liveness.heard_within(now, self.liveness.timeout * NODE_GONE_WINDOWS)
        events = membership_events(
            self.state,
            heartbeats,
            alive | {self.node_id},
            may_time_out,
            addresses,
            recently_heard=recently_heard | {self.node_id},
        )
        if not events and not self._membership_in_flight():
            events = replacement_events(
                self.state, self._nodes_with_model(), self.footprint_of, lambda: f"i-{secrets.token_hex(4)}"
            )
        # Membership events wait until the previous ones are applied, so none is emitted twice.
        if events and not self._membership_in_flight():
            self._membership_sent_at = self.master.sequencer.next_index
            self.master.submit_own(events)

    def _membership_in_flight(self) -> bool:
        sent_at = self._membership_sent_at
        return self.replica.last_index < sent_at

    def _own_heartbeat_view(self) -> m.Heartbeat:
        memory = psutil.virtual_memory()
        return m.Heartbeat(
            node_id=self.node_id,
            term=self.election.term,
            master_node_id=self.node_id,
            rank=self.election.rank(self.replica.durable_index),
            bus_port=self.bus.bus_port,
            memory_total_bytes=memory.total,
            memory_available_bytes=memory.available,
            hostname=self.hostname,
        )

    def _address_of(self, node_id: str) -> str | None:
        if node_id == self.node_id:
            return self.bus.self_address or f"{self.hostname}:{self.bus.bus_port}"
        return self.bus.address_of(node_id)

    # --- election ------------------------------------------------------------------------------

    async def _act(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case PersistTerm(term):
                    self.disk_faults.persist_term(self.term_path, term)
                case AnnounceCampaign(message):
                    self.bus.publish(m.TOPIC_ELECTION, message)
                case AnnounceVictory(message):
                    self.bus.publish(m.TOPIC_ELECTION, message)
                case BecomeMaster(term):
                    await self._become_master(term)
                case FollowMaster(node_id, term):
                    await self._follow(node_id, term)

    async def _become_master(self, term: int) -> None:
        logger.info("elected master for term %d", term)
        await self._sync_from_peers()
        async with self._apply_lock:
            # The previous master's events still queued here come before this term's first index:
            # applied after the sequencer started, they would collide with the indices it hands out.
            in_hand, self._apply_in_hand = self._apply_in_hand, None
            if in_hand is not None:
                await self._apply(in_hand)
            while not self._apply_queue.empty():
                await self._apply(self._apply_queue.get_nowait())
            self._start_sequencing(term)
        self._resend_all_local()

    def _start_sequencing(self, term: int) -> None:
        sequencer = Sequencer(
            self.node_id,
            term,
            self.replica.last_index,
            self.replica.high_water.copy(),
            instances=self.replica.state.instances,
        )
        self.master = Master(
            sequencer, self.replica, self._publish_events, on_store_failure=self._store_failed
        )
        self._master_since = time.monotonic()
        self._membership_sent_at = 0
        self.master.start()
        self.master.submit_own([MasterElected(term=term, node_id=self.node_id)])

    def _store_failed(self, error: Exception) -> None:
        """The master's store refused a commit (exo/node/disk_faults.py): step down, abstain."""
        if self.master is not None and self.disk_faults.store_failed(error):
            self.election.abstain = True
            self._spawn(self._step_down())

    async def _step_down(self) -> None:
        if self.master is not None:
            await self.master.stop()
            self.master = None
        await self._act(self.election.step_down(time.monotonic(), self.replica.durable_index))

    async def _sync_from_peers(self) -> None:
        """Before sequencing, take any events a live peer applied that this node missed."""
        deadline = time.monotonic() + PROMOTION_SYNC_SECONDS
        alive = self.liveness.alive(time.monotonic())
        ahead = sorted(
            (hb.rank.last_index, node_id)
            for node_id, hb in self.heartbeats.items()
            if node_id in alive and hb.rank.last_index > self.replica.last_index
        )
        if not ahead:
            return
        target, node_id = ahead[-1]
        while self.replica.last_index < target and time.monotonic() < deadline:
            if not await self._fetch_from(node_id, GapRequest(self.replica.last_index, target)):
                break

    async def _follow(self, node_id: str, term: int) -> None:
        if self.master is not None:
            logger.info("stepping down: %s leads term %d", node_id, term)
            await self.master.stop()
            self.master = None
        await self._reconcile_log_with(node_id)
        self._resend_all_local()

    async def _reconcile_log_with(self, master_id: str) -> None:
        """Drop this node's tail where it diverges from the master's log (a healed partition).

        One at a time, and only against the master still followed when it runs: a burst of
        follow decisions must not trim the log again after catch-up refilled it.
        """
        async with self._reconcile_lock:
            if self.election.master_node_id != master_id or self._reconciled_with == (
                master_id,
                self.election.master_term,
            ):
                return
            # A store that refuses writes (a full disk) cannot be compared: retry until it takes
            # them or another master leads, or this node would never apply another event.
            while not await self.disk_faults.retried(lambda: self._reconcile_once(master_id)):
                if self.election.master_node_id != master_id:
                    return
            self._reconciled_with = (master_id, self.election.master_term)

    def _log_matches_master(self) -> bool:
        """Whether this log was compared with the followed master's (its divergent tail dropped).
        Until then nothing of the master's is appended: an event placed after a divergent tail would
        make the two logs agree at their last index, and the comparison would keep the tail."""
        followed = (self.election.master_node_id, self.election.master_term)
        return not self._reconciling and self._reconciled_with == followed

    async def _reconcile_once(self, master_id: str) -> None:
        self._reconciling = True
        try:
            common = await find_common_prefix(self.replica, lambda index: self._event_at(master_id, index))
            if common is not None and common < self.replica.last_index:
                logger.warning(
                    "dropping events %d..%d: they are not in %s's history",
                    common + 1,
                    self.replica.last_index,
                    master_id,
                )
                await self.replica.truncate_after(common, await restore_state(self.replica.store, common))
                self.counters.events_dropped_on_reconcile += self.replica.last_index - common
        except RequestTimedOut:
            logger.warning("could not compare logs with %s; catch-up continues from here", master_id)
        finally:
            self._reconciling = False

    async def _event_at(self, node_id: str, index: int) -> IndexedEvent | None:
        reply = await self.bus.request(node_id, m.EventsRequested(index - 1, 1))
        if isinstance(reply, m.EventsAnswered) and reply.events and reply.events[0].index == index:
            return reply.events[0]
        return None

    def _resend_all_local(self) -> None:
        self._send_local(self.outbox.everything(time.monotonic()))

    def _publish_events(self, events: Sequence[IndexedEvent]) -> None:
        self.outbox.applied(events, time.monotonic(), self.replica.state.instances)
        self.bus.publish(
            m.TOPIC_GLOBAL_EVENTS, m.EventsPublished(self.election.term, self.node_id, list(events))
        )

    # --- catch-up ------------------------------------------------------------------------------

    def _maybe_fetch(self, now: float) -> None:
        master_id = self.election.master_node_id
        if (
            master_id is None
            or not self._log_matches_master()
            or (self._fetch_task is not None and not self._fetch_task.done())
        ):
            return
        master_heartbeat = self.heartbeats.get(master_id)
        known_last = master_heartbeat.rank.last_index if master_heartbeat is not None else 0
        gap = self.replica.orderer.gap(now, known_last)
        if gap is not None:
            self._fetch_task = asyncio.create_task(self._fetch_from(master_id, gap), name="cluster-fetch")

    async def _fetch_from(self, node_id: str, gap: GapRequest) -> bool:
        self.counters.fetches += 1
        try:
            if gap.since == 0 and gap.until > SNAPSHOT_CATCH_UP_THRESHOLD:
                return await self._install_snapshot_from(node_id)
            limit = max(1, min(gap.until - gap.since, FETCH_LIMIT))
            reply = await self.bus.request(node_id, m.EventsRequested(gap.since, limit))
        except RequestTimedOut:
            return False
        if isinstance(reply, m.EventsAnswered):
            if reply.first_index > gap.since + 1:
                return await self._install_snapshot_from(node_id)
            applied = await self.replica.receive(reply.events)
            self.outbox.applied(reply.events, time.monotonic(), self.replica.state.instances)
            return applied > 0
        return False

    async def _install_snapshot_from(self, node_id: str) -> bool:
        reply = await self.bus.request(node_id, m.SnapshotRequested(), timeout=10.0)
        if not isinstance(reply, m.SnapshotAnswered):
            return False
        await self.replica.install_snapshot(reply.index, decode_state(reply.state))
        self.counters.snapshots_installed += 1
        return True

    # --- handlers ------------------------------------------------------------------------------

    def _on_heartbeat(self, heartbeat: m.Heartbeat) -> None:
        now = time.monotonic()
        if heartbeat.node_id == self.node_id:
            return
        self.liveness.heard(heartbeat.node_id, now)
        self.heartbeats[heartbeat.node_id] = heartbeat
        for address in heartbeat.known_peers:
            if address not in self.bus.peers:
                self.bus.add_peer(address)
        actions = self.election.on_heartbeat(heartbeat, now, self.replica.durable_index, self.has_quorum())
        self._spawn_act(actions)

    def _on_election(self, message: m.ElectionMessage) -> None:
        now = time.monotonic()
        if message.rank.node_id == self.node_id:
            return
        self.liveness.heard(message.rank.node_id, now)
        match message:
            case m.CampaignStarted():
                actions = self.election.on_campaign(message, now, self.replica.durable_index)
            case m.VictoryDeclared():
                actions = self.election.on_victory(message, now, self.replica.durable_index)
        self._spawn_act(actions)

    def _spawn_act(self, actions: list[Action]) -> None:
        if actions:
            self._spawn(self._act(actions))

    def _spawn(self, coroutine: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.append(task)  # type: ignore[arg-type]
        task.add_done_callback(self._tasks_done)

    def _tasks_done(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("election action failed", exc_info=task.exception())

    def _on_global_events(self, message: m.EventsPublished) -> None:
        self.liveness.heard(message.master_node_id, time.monotonic())
        if (
            message.master_node_id != self.election.master_node_id
            or message.term != self.election.master_term
        ):
            # A stale or competing master: the election decides whom to follow; catch-up fetches later.
            self.counters.stale_term_messages += 1
            return
        if not self._log_matches_master():
            return
        try:
            self._apply_queue.put_nowait(message.events)
        except asyncio.QueueFull:
            self.counters.apply_queue_full += 1

    async def _apply_loop(self) -> None:
        while True:
            self._apply_in_hand = await self._apply_queue.get()
            async with self._apply_lock:
                events, self._apply_in_hand = self._apply_in_hand, None
                if events is None:
                    continue  # a promotion to master applied them first
                while not self._apply_queue.empty() and len(events) < FETCH_LIMIT:
                    events = events + self._apply_queue.get_nowait()
                await self._apply(events)

    async def _apply(self, events: list[IndexedEvent]) -> None:
        await self.replica.receive(events)
        self.outbox.applied(events, time.monotonic(), self.replica.state.instances)

    def _on_local_events(self, message: m.LocalEventsSent) -> None:
        self.liveness.heard(message.node_id, time.monotonic())
        if self.master is not None:
            self.master.submit_local(message.node_id, message.events)

    def _on_command(self, command: m.Command) -> None:
        if self.master is not None:
            self._spawn(self.execute(command))

    async def execute(self, command: m.Command) -> m.CommandAnswered:
        """Decide and sequence a command (master only); answers once its events are applied here."""
        if self.master is None:
            return m.CommandAnswered(m.Refused("not_master", "not the master"))
        answering = self.liveness.alive(time.monotonic()) | {self.node_id}
        outcome = decide(
            command, self.state, self._nodes_with_model(), f"i-{secrets.token_hex(4)}", answering
        )
        try:
            async with asyncio.timeout(COMMAND_COMMIT_SECONDS):
                await self.master.submit_own(outcome.events)
        except (TimeoutError, OverflowError) as error:
            return m.CommandAnswered(m.Refused("not_committed", f"not committed: {error!r}"))
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

    async def _on_request(self, request: m.Request, peer_host: str) -> m.Reply:
        match request:
            case m.HelloRequested():
                if request.node_id != self.node_id:
                    self.bus.add_peer(f"{request.bus_host or peer_host}:{request.bus_port}")
                return m.HelloAnswered(
                    node_id=self.node_id,
                    pub_port=self.bus.pub_port,
                    term=self.election.term,
                    master_node_id=self.election.master_node_id,
                )
            case m.EventsRequested():
                first = await self.replica.store.first_index()
                limit = max(1, min(request.limit, FETCH_LIMIT))
                events = await self.replica.store.read(request.since + 1, limit=limit)
                return m.EventsAnswered(events, self.replica.last_index, first)
            case m.SnapshotRequested():
                state = self.replica.state
                return m.SnapshotAnswered(state.last_event_index, encode_state(state))
            case m.CommandRequested():
                if self.master is None:
                    return m.RequestFailed(f"not the master; ask {self.election.master_node_id}")
                return await self.execute(request.command)
            case m.FileChunkRequested():
                if self.serve_file_chunk is None:
                    return m.RequestFailed("this node serves no model files")
                return await self.serve_file_chunk(request)
            case m.HubModelRequested():
                if self.serve_hub_model is None:
                    return m.RequestFailed("this node knows no Hub models")
                return await self.serve_hub_model(request)
            case m.LinkProbed():
                return m.LinkProbeAnswered(len(request.payload))
