"""The Raft shell: runs one node's sans-IO core (exo/roles/raft.py) on the bus and the store.

- `Send` goes out at once on the `election` topic (every message names its addressee).
- `PersistTerm` writes (term, voted_for) to DATA_DIR/term, fsynced, before any later `Send` of the
  same step (a vote); when the disk refuses, those sends are dropped (a vote never sent is safe).
- `WriteLog` goes through one disk task: consecutive appends are grouped into one store commit and
  the core hears `persisted` once it is durable. `Apply` goes, in order, through an apply task that
  folds committed entries into the replica (answering whoever waits) as soon as the store holds
  them, without waiting for the writes of later entries queued meanwhile: at a steady rate a
  follower hears a commit while the next entry's fsync runs, and waiting for it was most of the
  tail latency (docs/benchmarks.md, quorum path). What a node applies is always in its own store,
  and the commit index it records (lazily, at most once a second and at close, off both paths)
  never runs ahead of it.
- A store that refuses a write (full disk) is retried every RETRY_SECONDS; while it fails the node
  takes no messages and does not tick (as if paused), and a master steps down first.
- Compaction and `FetchSnapshot` (exo/node/raft_snapshots.py): a snapshot every `compact_every`
  applied entries, taken on the apply task; a master's snapshot is fetched, checked, then installed
  once the write and apply queues drained, with the node paused meanwhile (as above).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from exo.bus.transport import Bus, RequestTimedOut
from exo.core import messages as m
from exo.core.events import Event, IndexedEvent
from exo.core.raft_messages import EntriesSent, RaftMessage
from exo.node.disk_faults import RETRY_SECONDS, DiskFaults
from exo.node.env_settings import positive_setting
from exo.node.raft_snapshots import (
    SNAPSHOT_FETCH_SECONDS,
    SNAPSHOT_RETRY_SECONDS,
    SnapshotRejected,
    compact_every_from_env,
    state_from_answer,
    store_snapshot,
)
from exo.node.replica import Replica, StoredLog
from exo.roles.raft import (
    Action,
    Apply,
    FetchSnapshot,
    PersistTerm,
    Raft,
    RaftTimings,
    RoleChanged,
    Send,
    WriteLog,
)
from exo.store.base import Snapshot, StoreError

logger = logging.getLogger(__name__)

# etcd's defaults; tests may shorten them.
ELECTION_TIMEOUT = float(os.environ.get("EXO_ELECTION_TIMEOUT", "1.0"))
RAFT_HEARTBEAT = float(os.environ.get("EXO_RAFT_HEARTBEAT", "0.1"))
# Queued log writes and applies; past this the node takes no more messages until the disk catches up.
MAX_DISK_BACKLOG = 10_000
COMMIT_RECORD_SECONDS = float(os.environ.get("EXO_COMMIT_RECORD_SECONDS", "1.0"))
CLOSE_DRAIN_SECONDS = 5.0
# A voter the master has not heard from for this long is removed (a committed NodeRemoved); "off"
# keeps every voter until `exo cluster remove`. A day: a laptop closed overnight stays a member.
REMOVE_AFTER_DEFAULT = 86_400.0


def remove_after_from_env() -> float | None:
    raw = os.environ.get("EXO_REMOVE_AFTER", "").strip().lower()
    if raw in ("off", "none", "never"):
        return None
    return positive_setting("EXO_REMOVE_AFTER", float, REMOVE_AFTER_DEFAULT, "a number of seconds or 'off'")


def read_hard_state(path: Path) -> tuple[int, str | None]:
    """(term, voted_for) from DATA_DIR/term: "TERM" (the format before Raft) or "TERM VOTED_FOR"."""
    try:
        words = path.read_text().split()
    except FileNotFoundError:
        return 0, None
    try:
        term = int(words[0]) if words else 0
    except ValueError as error:
        raise SystemExit(f"exo: {path} does not hold a term number; remove it to start at 0") from error
    return term, (words[1] if len(words) > 1 else None)


def default_timings() -> RaftTimings:
    return RaftTimings(
        election_timeout=ELECTION_TIMEOUT,
        heartbeat_interval=RAFT_HEARTBEAT,
        remove_after=remove_after_from_env(),
    )


class RaftMember:
    def __init__(
        self,
        node_id: str,
        bus: Bus,
        replica: Replica,
        term_path: Path,
        disk_faults: DiskFaults,
        *,
        on_applied: Callable[[Sequence[IndexedEvent]], None],
        on_role: Callable[[RoleChanged], None],
        timings: RaftTimings | None = None,
    ) -> None:
        self.node_id = node_id
        self.bus = bus
        self.replica = replica
        self.term_path = term_path
        self.disk_faults = disk_faults
        self.on_applied = on_applied
        self.on_role = on_role
        term, voted_for = read_hard_state(term_path)
        log = replica.log
        replica.log = StoredLog([])  # the core holds it from here
        last_term = log.entries[-1].term if log.entries else log.base_term
        if term < max(last_term, replica.state.term):
            term, voted_for = max(last_term, replica.state.term), None
        self.core = Raft(
            node_id,
            random.Random(),
            time.monotonic(),
            term=term,
            voted_for=voted_for,
            log=list(log.entries),
            applied=replica.last_index,
            base_index=log.base_index,
            base_term=log.base_term,
            base_voters=log.base_voters,
            timings=timings or default_timings(),
        )
        self._disk: asyncio.Queue[WriteLog] = asyncio.Queue()
        # Each apply waits for the write ticket it needs (see _ticket_for); tickets count WriteLogs.
        self._applies: asyncio.Queue[tuple[int, Apply]] = asyncio.Queue()
        self._unwritten: collections.deque[tuple[int, int]] = collections.deque()  # (ticket, first index)
        self._queued_writes = 0
        self._landed_writes = 0
        self._disk_task: asyncio.Task[None] | None = None
        self._apply_task: asyncio.Task[None] | None = None
        self._record_task: asyncio.Task[None] | None = None
        self._wrote = asyncio.Event()  # set after each write lands: an apply may be waiting for it
        self._has_room = asyncio.Event()  # the disk queue is below half its bound
        self._has_room.set()
        self.stalled = False  # the store refuses writes: take no messages, do not tick
        self.stored_index = self.core.last_index  # the store holds the core's log up to here
        self.leader_commit = 0  # the master's commit index, as its last message said
        self._recorded_commit = replica.last_index
        self._recorded_at = 0.0
        self.dropped_messages = 0
        self.compact_every = compact_every_from_env()
        self.snapshot_index = self.core.base_index  # the store holds a snapshot here (0: none needed)
        self.snapshots_installed = 0
        self.snapshots_rejected = 0
        self._installing = False  # a master's snapshot goes in: take no messages, do not tick
        self._fetch_task: asyncio.Task[None] | None = None
        self._fetch_after = 0.0  # after a refused snapshot, the next try waits (and logs less)
        self._rejected_index: int | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.core.now = time.monotonic()
        self._disk_task = asyncio.create_task(self._disk_loop(), name="raft-disk")
        self._apply_task = asyncio.create_task(self._apply_loop(), name="raft-apply")

    async def close(self) -> None:
        """Finish queued writes (briefly), record the commit index, stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_DRAIN_SECONDS):
                await self._disk.join()
                await self._applies.join()
        for task in (self._fetch_task, self._disk_task, self._apply_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._record_task is not None:
            await self._record_task  # a store write: let it finish rather than cut it
        await self._record_commit(force=True)

    async def room(self) -> None:
        """Wait while the disk queue is over half full (the master proposes no more meanwhile)."""
        await self._has_room.wait()

    @property
    def disk_backlog(self) -> int:
        return self._disk.qsize() + self._applies.qsize()

    # --- inputs --------------------------------------------------------------------------------

    def tick(self, now: float, abstaining: bool) -> None:
        if self.stalled or self._installing or (abstaining and self.core.role != "leader"):
            return
        self.handle(self.core.tick(now))

    def receive(self, message: RaftMessage) -> None:
        if message.to != self.node_id:
            return
        if self.stalled or self._installing or self.disk_backlog >= MAX_DISK_BACKLOG:
            self.dropped_messages += 1  # Raft tolerates a lost message: the master resends
            return
        if isinstance(message, EntriesSent):
            self.leader_commit = message.leader_commit
        self.handle(self.core.receive(message, time.monotonic()))

    def propose(self, items: Sequence[tuple[str, int, Event]]) -> list[IndexedEvent]:
        """Leader only: append; MembershipChangePending when it would be a second voter change."""
        entries, actions = self.core.propose(items)
        self.handle(actions)
        return entries

    def handle(self, actions: list[Action]) -> None:
        term_failed = False
        for action in actions:
            match action:
                case Send(message):
                    if not term_failed:
                        self.bus.publish(m.TOPIC_ELECTION, message)
                case PersistTerm(term, voted_for):
                    term_failed = not self.disk_faults.persist_term(self.term_path, term, voted_for)
                case WriteLog():
                    self._queued_writes += 1
                    self._unwritten.append((self._queued_writes, action.entries[0].index))
                    self._disk.put_nowait(action)
                    self._note_backlog()
                case Apply():
                    self._applies.put_nowait((self._ticket_for(action.entries[-1].index), action))
                    self._note_backlog()
                case RoleChanged():
                    self.on_role(action)
                case FetchSnapshot():
                    # The master repeats its offer every heartbeat: one fetch at a time.
                    idle = self._fetch_task is None or self._fetch_task.done()
                    if idle and time.monotonic() >= self._fetch_after:
                        self._fetch_task = asyncio.create_task(self._install(action), name="raft-snapshot")

    # --- the disk ------------------------------------------------------------------------------

    def _note_backlog(self) -> None:
        if self.disk_backlog >= MAX_DISK_BACKLOG // 2:
            self._has_room.clear()
        else:
            self._has_room.set()

    async def _disk_loop(self) -> None:
        while True:
            taken = [await self._disk.get()]
            while not self._disk.empty() and len(taken) < 256:
                taken.append(self._disk.get_nowait())
            position = 0
            while position < len(taken):
                action = taken[position]
                start = position
                position += 1
                entries = list(action.entries)
                while position < len(taken) and taken[position].truncate_after is None:
                    entries.extend(taken[position].entries)  # continues the previous write: one commit
                    position += 1
                await self._write(action.truncate_after, entries)
                self._landed_writes += position - start
                for _ in range(position - start):
                    self._unwritten.popleft()
                self._wrote.set()
            for _ in taken:
                self._disk.task_done()
            self._note_backlog()

    def _ticket_for(self, index: int) -> int:
        """The last queued write holding an entry at or before `index`: an apply up to `index` waits
        for it and for nothing queued after it. A write queued later never starts at or before a
        committed index (that would truncate a committed entry), so the answer holds once given."""
        for ticket, first in reversed(self._unwritten):
            if first <= index:
                return ticket
        return self._landed_writes

    async def _apply_loop(self) -> None:
        """Applies in order, each once the store holds its entries (its write ticket landed)."""
        while True:
            taken = [await self._applies.get()]
            while not self._applies.empty() and len(taken) < 256:
                taken.append(self._applies.get_nowait())
            needed = max(ticket for ticket, _ in taken)
            while self._landed_writes < needed:
                self._wrote.clear()
                await self._wrote.wait()
            await self._apply([entry for _, action in taken for entry in action.entries])
            for _ in taken:
                self._applies.task_done()
            self._note_backlog()

    async def _write(self, truncate_after: int | None, entries: list[IndexedEvent]) -> None:
        store = self.replica.store

        async def write() -> None:
            if truncate_after is not None:
                await store.truncate_after(truncate_after)
            await store.append(entries)

        await self._until_stored(write, step_down=True)  # a master that cannot write lets another lead
        last = entries[-1]
        self.stored_index = last.index
        self.handle(self.core.persisted(last.index, last.term))

    async def _until_stored(self, write: Callable[[], Awaitable[None]], *, step_down: bool) -> None:
        """Run `write` until the store takes it, every RETRY_SECONDS; while it refuses, the node is
        stalled (takes no messages, does not tick) and, with `step_down`, stops leading first."""
        while True:
            try:
                await write()
                break
            except StoreError as error:
                if not self.stalled:
                    self.stalled = True
                    self.disk_faults.store_failed(error)
                    if step_down:
                        self.handle(self.core.step_down())
                await asyncio.sleep(RETRY_SECONDS)
        if self.stalled:
            logger.info("the event store takes writes again")
            self.stalled = False

    async def _apply(self, entries: list[IndexedEvent]) -> None:
        await self.replica.apply(entries)
        self.on_applied(entries)
        due = time.monotonic() - self._recorded_at >= COMMIT_RECORD_SECONDS
        if due and (self._record_task is None or self._record_task.done()):
            # Its own task: the record is a store write (an fsync) that neither path should wait for.
            self._record_task = asyncio.create_task(self._record_commit(), name="raft-record-commit")
        await self._compact()

    # --- compaction and snapshots (exo/node/raft_snapshots.py) ---------------------------------

    async def _compact(self) -> None:
        """On the apply task, right after an apply (the state is at the applied index): every
        `compact_every` entries a store snapshot, and the core forgets up to the previous one."""
        applied = self.replica.last_index
        if applied - self.snapshot_index < self.compact_every:
            return
        try:
            await self.replica.store.save_snapshot(Snapshot(applied, self.replica.state))
        except StoreError as error:
            logger.debug("no snapshot at %d yet: %s", applied, error)
            return
        previous, self.snapshot_index = self.snapshot_index, applied
        self.core.compact(previous)

    async def _install(self, fetch: FetchSnapshot) -> None:
        """Fetch the offered snapshot, check it, and only then pause, drain the disk queue (so the
        store holds exactly the core's log), store it durably and hand it to the core. A refused
        or unusable answer changes nothing; the master offers again at its next heartbeat."""
        try:
            reply = await self.bus.request(
                fetch.leader_id, m.SnapshotRequested(fetch.index), timeout=SNAPSHOT_FETCH_SECONDS
            )
            state = state_from_answer(reply, fetch.index)
        except (RequestTimedOut, SnapshotRejected) as error:
            self.snapshots_rejected += 1
            self._fetch_after = time.monotonic() + SNAPSHOT_RETRY_SECONDS
            level = logging.DEBUG if self._rejected_index == fetch.index else logging.WARNING
            self._rejected_index = fetch.index
            logger.log(level, "snapshot at %d from %s not installed: %s", fetch.index, fetch.leader_id, error)
            return
        self._installing = True
        try:
            # Writes first (applies wait for them), then applies: none may fold an entry into the
            # state after the snapshot replaced it.
            await self._disk.join()
            await self._applies.join()
            core = self.core
            if fetch.index <= core.commit_index or core.role != "follower":
                return  # committed meanwhile, or this node leads now: nothing to install
            keep = core.keeps_log(fetch.index, fetch.term)
            # Retried like a log write (both steps repeat safely): a half-done install would leave
            # the store shorter than the core's log, and the next append would not continue it.
            await self._until_stored(
                lambda: store_snapshot(self.replica.store, state, keep, self.stored_index), step_down=False
            )
            await self.replica.install(state)
            if not keep:
                self.stored_index = fetch.index
            self.snapshot_index = fetch.index
            self.snapshots_installed += 1
            logger.info("installed %s's snapshot at %d", fetch.leader_id, fetch.index)
            self.handle(core.install_snapshot(fetch.index, fetch.term, fetch.voters))
            await self._record_commit(force=True)
        finally:
            self._installing = False

    async def _record_commit(self, force: bool = False) -> None:
        index = self.replica.last_index
        now = time.monotonic()
        if index <= self._recorded_commit or (not force and now - self._recorded_at < COMMIT_RECORD_SECONDS):
            return
        try:
            await self.replica.store.save_commit_index(index)
        except StoreError as error:
            logger.debug("commit index %d not recorded: %s", index, error)
            return
        self._recorded_commit, self._recorded_at = index, now
