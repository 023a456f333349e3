"""A deterministic simulator of a cluster of Raft cores (the FoundationDB / TigerBeetle VOPR way).

Every node's sans-IO core (`exo.roles.raft.Raft`) runs in one process on a simulated clock; one
seed fixes everything: the cluster size, the network's delays, drops, duplicates and reordering,
partitions that flap, pauses, crashes that lose writes not yet fsynced, full disks (a master whose
disk is full steps down, as the node's shell does), leadership transfers (a node campaigning at
once past pre-vote and lease, as a `--force-master` node does), and log compaction at random points
on every node (a durable snapshot of the applied prefix), so far-behind nodes catch up by installing
a snapshot. Clients
propose `NodeLabelled` events to whichever node they believe leads and record every acknowledgement.

Invariants are checked after every step (`Violation` names the seed, time and rule):
- at most one leader per term;
- log matching: an (index, term) names one entry everywhere, preceded by the same term;
- every committed entry is in the log of every leader of a later term;
- no two nodes apply different entries at one index;
- a snapshot is a committed prefix (offered and installed only at committed indices, with the
  committed entry's term);
and, once the faults stop and the network heals: every acknowledged write is in every node's log
(or snapshot) and all logs (and commit indices) are equal.

`python -m tests.harness.sim SEED` replays one seed (add `-v` for the trace).
"""

from __future__ import annotations

import heapq
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from exo.core.events import Event, IndexedEvent, NodeJoined, NodeLabelled
from exo.core.raft_messages import RaftMessage
from exo.roles.raft import (
    Action,
    Apply,
    FetchSnapshot,
    MembershipChangePending,
    PersistTerm,
    Raft,
    RaftTimings,
    RoleChanged,
    Send,
    WriteLog,
)

TICK = 0.02
TIMINGS = RaftTimings(
    election_timeout=0.3, heartbeat_interval=0.05, max_entries_per_message=64, remove_after=None
)


class Violation(AssertionError):
    pass


@dataclass
class Disk:
    """What survives a crash: the snapshot (`base_*`), the fsynced log after it and (term, vote);
    `pending` writes are lost."""

    log: list[IndexedEvent] = field(default_factory=list[IndexedEvent])
    base_index: int = 0
    base_term: int = 0
    base_voters: frozenset[str] | None = None
    term: int = 0
    voted_for: str | None = None
    pending: list[WriteLog] = field(default_factory=list[WriteLog])
    full_until: float = 0.0
    fsync_scheduled: bool = False


@dataclass
class SimNode:
    node_id: str
    raft: Raft
    disk: Disk
    up: bool = True
    paused_until: float = 0.0
    inbox: list[RaftMessage] = field(default_factory=list[RaftMessage])  # held while paused
    incarnation: int = 0


@dataclass
class FaultCounts:
    partitions: int = 0
    flaps: int = 0
    pauses: int = 0
    crashes: int = 0
    full_disks: int = 0
    transfers: int = 0
    step_downs: int = 0
    compactions: int = 0
    snapshots_installed: int = 0
    dropped: int = 0
    duplicated: int = 0

    @property
    def total(self) -> int:
        return self.partitions + self.flaps + self.pauses + self.crashes + self.full_disks


class Simulation:
    def __init__(
        self,
        seed: int,
        *,
        chaos_seconds: float = 4.0,
        heal_seconds: float = 6.0,
        trace: bool = False,
        raft_class: type[Raft] = Raft,
    ):
        self.seed = seed
        self.raft_class = raft_class
        self.rng = random.Random(seed)
        rng = self.rng
        self.size = rng.choice([1, 2, 3, 3, 3, 5, 5])
        self.ids = [f"n{i}" for i in range(self.size)]
        self.bootstrap = self.size > 1 and rng.random() < 0.3  # n0 alone, the rest join through the log
        self.remove_after = rng.choice([None, None, 1.5]) if self.size >= 3 else None
        self.timings = RaftTimings(
            TIMINGS.election_timeout,
            TIMINGS.heartbeat_interval,
            TIMINGS.max_entries_per_message,
            self.remove_after,
        )
        # Most seeds compact; the chance per node tick of compacting to a random applied index.
        self.compact_rate = rng.choice([0.0, 0.02, 0.1, 0.3])
        self.drop_rate = rng.choice([0.0, 0.02, 0.1, 0.3])
        self.dup_rate = rng.choice([0.0, 0.02, 0.1])
        self.max_delay = rng.choice([0.002, 0.01, 0.05, 0.2])
        self.fsync_delay = rng.choice([0.001, 0.005, 0.03])
        # A profile per seed: an even mix, or mostly crashes (the Raft paper's figure 8 needs masters
        # crashing one after another), or mostly partitions.
        self.fault_kinds = rng.choice(
            [
                ["partition", "flap", "pause", "crash", "disk", "transfer", "none"],
                ["crash", "crash", "crash", "partition", "pause"],
                ["partition", "partition", "flap", "pause"],
            ]
        )
        self.chaos_until = chaos_seconds
        self.end = chaos_seconds + heal_seconds
        self.trace = trace
        self.now = 0.0
        self.faults = FaultCounts()
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = 0
        self.cut: set[frozenset[str]] = set()  # links that drop everything
        self.nodes: dict[str, SimNode] = {}
        for node_id in self.ids:
            self.nodes[node_id] = SimNode(node_id, self._new_raft(node_id, Disk()), Disk())
        # Invariant bookkeeping.
        self.leaders: dict[int, str] = {}
        self.entry_at: dict[tuple[int, int], IndexedEvent] = {}
        self.prev_term_of: dict[tuple[int, int], int] = {}
        self.committed: dict[int, IndexedEvent] = {}
        # The lowest term a node applying the entry was in: leaders of later terms must hold it.
        self.committed_in: dict[int, int] = {}
        self.acknowledged: dict[int, int] = {}  # write id -> index
        self._proposed: dict[tuple[str, int], int] = {}  # (leader, index) -> write id
        self._next_write = 0
        self.steps = 0

    # --- setup ---------------------------------------------------------------------------------

    def _new_raft(self, node_id: str, disk: Disk) -> Raft:
        base_voters = frozenset() if self.bootstrap else frozenset(self.ids)
        if disk.base_voters is not None:
            base_voters = disk.base_voters
        return self.raft_class(
            node_id,
            random.Random(self.rng.random()),
            self.now,
            term=disk.term,
            voted_for=disk.voted_for,
            log=list(disk.log),
            applied=disk.base_index,  # the shell restored the snapshot's state
            base_index=disk.base_index,
            base_term=disk.base_term,
            base_voters=base_voters,
            bootstrap=NodeJoined(node_id, f"{node_id}:1") if self.bootstrap and node_id == "n0" else None,
            timings=self.timings,
        )

    def at(self, when: float, step: Callable[[], None]) -> None:
        self._order += 1
        heapq.heappush(self._queue, (when, self._order, step))

    # --- running -------------------------------------------------------------------------------

    def run(self) -> None:
        for index, node_id in enumerate(self.ids):
            self.at(TICK * index / self.size, lambda n=node_id: self._tick(n))
        self.at(0.05, self._client)
        self.at(0.1, self._fault)
        self.at(self.chaos_until, self._heal)
        while self._queue:
            when, _, step = heapq.heappop(self._queue)
            if when > self.end:
                break
            self.now = when
            step()
            self.steps += 1
        self.check_converged()

    def _log(self, text: str) -> None:
        if self.trace:
            print(f"{self.now:8.3f} {text}")

    def _tick(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.up and node.paused_until <= self.now:
            if node.inbox:
                inbox, node.inbox = node.inbox, []
                for message in inbox:
                    self._act(node, node.raft.receive(message, self.now))
            self._act(node, node.raft.tick(self.now))
            self._add_members(node)
            if self.rng.random() < self.compact_rate:
                self._compact(node)
        self.at(self.now + TICK, lambda: self._tick(node_id))

    def _add_members(self, node: SimNode) -> None:
        """The leader's shell adds the nodes it knows of that are not voters (one change at a time)."""
        raft = node.raft
        if raft.role != "leader" or not raft.membership_change_allowed:
            return
        missing = [n for n in self.ids if n not in raft.voters and self.nodes[n].up]
        if missing:
            self._propose(node, [(node.node_id, -1, NodeJoined(missing[0], f"{missing[0]}:1"))])

    def _compact(self, node: SimNode) -> None:
        """The shell snapshots the applied state durably and compacts the core's log to it."""
        raft = node.raft
        if raft.applied <= raft.base_index:
            return
        index = self.rng.randint(raft.base_index + 1, raft.applied)
        raft.compact(index)
        self.faults.compactions += 1
        self._save_snapshot(node.disk, index, raft.base_term, raft.base_voters, keep=True)

    def _save_snapshot(
        self, disk: Disk, index: int, term: int, voters: frozenset[str], *, keep: bool
    ) -> None:
        """Durable at once (its own file): entries up to `index` leave the disk; the rest too unless
        `keep`, and then so do the writes not yet fsynced (they continue the discarded log)."""
        disk.base_index, disk.base_term, disk.base_voters = index, term, voters
        if keep:
            disk.log = [entry for entry in disk.log if entry.index > index]
        else:
            disk.log = []
            disk.pending = []

    def _install(self, node: SimNode, fetch: FetchSnapshot) -> None:
        """The follower's shell fetches the state (the committed prefix) and installs it."""
        for index in range(1, fetch.index + 1):
            if index not in self.committed:
                self.fail(f"{node.node_id} was offered a snapshot at {fetch.index}, {index} uncommitted")
        if self.committed[fetch.index].term != fetch.term:
            self.fail(f"snapshot at {fetch.index} has term {fetch.term}, not the committed entry's")
        raft = node.raft
        if fetch.index <= raft.commit_index:
            return
        keep = raft.keeps_log(fetch.index, fetch.term)
        self._save_snapshot(node.disk, fetch.index, fetch.term, fetch.voters, keep=keep)
        self.faults.snapshots_installed += 1
        self._log(f"{node.node_id} installs a snapshot at {fetch.index} (keeps its log: {keep})")
        self._act(node, raft.install_snapshot(fetch.index, fetch.term, fetch.voters))

    def _propose(self, node: SimNode, items: list[tuple[str, int, Event]]) -> list[IndexedEvent]:
        try:
            entries, actions = node.raft.propose(items)
        except MembershipChangePending:
            return []
        self._act(node, actions)
        return entries

    def _client(self) -> None:
        if self.now < self.chaos_until + 1.0:  # writes stop a second into the calm
            leaders = [n for n in self.ids if self.nodes[n].raft.role == "leader"]
            # Most clients know a leader (perhaps a stale one); some ask any node.
            pick = leaders if leaders and self.rng.random() < 0.8 else self.ids
            node = self.nodes[self.rng.choice(pick)]
            if node.up and node.paused_until <= self.now and node.raft.role == "leader":
                self._next_write += 1
                write = self._next_write
                event = NodeLabelled(node.node_id, "w", str(write))
                for entry in self._propose(node, [("client", write, event)]):
                    self._proposed[(node.node_id, entry.index)] = write
            self.at(self.now + self.rng.uniform(0.005, 0.05), self._client)

    # --- actions -------------------------------------------------------------------------------

    def _act(self, node: SimNode, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Send(message):
                    self._send(node.node_id, message)
                case PersistTerm(term, voted_for):
                    node.disk.term, node.disk.voted_for = term, voted_for
                case WriteLog():
                    self._check_entries(node, action.entries)
                    node.disk.pending.append(action)
                    self._schedule_fsync(node)
                case Apply(entries):
                    self._check_applied(node, entries)
                case RoleChanged(role, term, _):
                    self._log(f"{node.node_id} {role} term {term}")
                    if role == "leader":
                        self._check_leader(node, term)
                case FetchSnapshot():
                    self._install(node, action)

    def _send(self, source: str, message: RaftMessage) -> None:
        target = message.to
        if frozenset((source, target)) in self.cut or self.rng.random() < self.drop_rate:
            self.faults.dropped += 1
            return
        copies = 2 if self.rng.random() < self.dup_rate else 1
        self.faults.duplicated += copies - 1
        incarnation = self.nodes[target].incarnation
        for _ in range(copies):
            delay = self.rng.uniform(0.0005, self.max_delay)
            self.at(self.now + delay, lambda: self._deliver(source, target, message, incarnation))

    def _deliver(self, source: str, target: str, message: RaftMessage, incarnation: int) -> None:
        node = self.nodes[target]
        if not node.up or node.incarnation != incarnation or frozenset((source, target)) in self.cut:
            return
        if node.paused_until > self.now:
            node.inbox.append(message)
            return
        self._act(node, node.raft.receive(message, self.now))

    def _schedule_fsync(self, node: SimNode) -> None:
        if node.disk.fsync_scheduled:
            return
        node.disk.fsync_scheduled = True
        incarnation = node.incarnation
        self.at(self.now + self.fsync_delay, lambda: self._fsync(node, incarnation))

    def _fsync(self, node: SimNode, incarnation: int) -> None:
        disk = node.disk
        disk.fsync_scheduled = False
        if node.incarnation != incarnation or not node.up:
            return
        if disk.full_until > self.now and node.raft.role == "leader":
            self.faults.step_downs += 1  # the node's shell: a master whose store refuses steps down
            self._act(node, node.raft.step_down())
        if disk.full_until > self.now or node.paused_until > self.now:
            self.at(max(disk.full_until, node.paused_until), lambda: self._fsync(node, incarnation))
            disk.fsync_scheduled = True
            return
        writes, disk.pending = disk.pending, []
        for write in writes:
            if write.truncate_after is not None:
                del disk.log[max(0, write.truncate_after - disk.base_index) :]
            entries = [entry for entry in write.entries if entry.index > disk.base_index]
            assert not entries or entries[0].index == disk.base_index + len(disk.log) + 1, "disk log gap"
            disk.log.extend(entries)
        if disk.log:
            last = disk.log[-1]
            self._act(node, node.raft.persisted(last.index, last.term))
        elif disk.base_index:
            self._act(node, node.raft.persisted(disk.base_index, disk.base_term))

    # --- faults --------------------------------------------------------------------------------

    def _fault(self) -> None:
        if self.now >= self.chaos_until:
            return
        rng = self.rng
        kind = rng.choice(self.fault_kinds)
        victim = rng.choice(self.ids)
        duration = rng.uniform(0.2, 2.0)
        if kind == "partition" and self.size > 1:
            self.faults.partitions += 1
            side = set(rng.sample(self.ids, rng.randint(1, self.size - 1)))
            links = {frozenset((a, b)) for a in side for b in self.ids if b not in side}
            self.cut |= links
            self.at(self.now + duration, lambda: self.cut.difference_update(links))
        elif kind == "flap" and self.size > 1:
            self.faults.flaps += 1
            other = rng.choice([n for n in self.ids if n != victim])
            link = frozenset((victim, other))
            for flip in range(int(duration / 0.1)):
                self.at(
                    self.now + flip * 0.1,
                    lambda f=flip: (self.cut.add if f % 2 == 0 else self.cut.discard)(link),
                )
            self.at(self.now + duration, lambda: self.cut.discard(link))
        elif kind == "pause":
            self.faults.pauses += 1
            node = self.nodes[victim]
            node.paused_until = max(node.paused_until, self.now + duration)
        elif kind == "crash" and self.nodes[victim].up:
            self.faults.crashes += 1
            self._crash(victim)
            self.at(self.now + duration, lambda: self._restart(victim))
        elif kind == "transfer" and self.nodes[victim].up:
            self.faults.transfers += 1  # a --force-master node campaigning at once, past the lease
            node = self.nodes[victim]
            self._act(node, node.raft.campaign_now())
        elif kind == "disk":
            self.faults.full_disks += 1
            disk = self.nodes[victim].disk
            disk.full_until = max(disk.full_until, self.now + duration)
        self.at(self.now + rng.uniform(0.05, 0.6), self._fault)

    def _crash(self, node_id: str) -> None:
        node = self.nodes[node_id]
        self._log(f"{node_id} crashes ({len(node.disk.pending)} writes not fsynced)")
        node.up = False
        node.incarnation += 1
        node.disk.pending = []
        node.disk.fsync_scheduled = False
        node.inbox = []

    def _restart(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.up:
            return
        node.raft = self._new_raft(node_id, node.disk)
        node.up = True
        node.paused_until = 0.0
        self._log(f"{node_id} restarts with {len(node.disk.log)} entries, term {node.disk.term}")

    def _heal(self) -> None:
        self._log("heal")
        self.cut.clear()
        self.drop_rate = 0.0
        self.dup_rate = 0.0
        for node_id, node in self.nodes.items():
            node.paused_until = min(node.paused_until, self.now)
            node.disk.full_until = 0.0
            if not node.up:
                self._restart(node_id)

    # --- invariants ----------------------------------------------------------------------------

    def fail(self, rule: str) -> None:
        raise Violation(f"seed {self.seed} at {self.now:.3f}s: {rule}")

    def _check_leader(self, node: SimNode, term: int) -> None:
        other = self.leaders.setdefault(term, node.node_id)
        if other != node.node_id:
            self.fail(f"two leaders in term {term}: {other} and {node.node_id}")
        raft = node.raft
        for index, entry in self.committed.items():
            if index <= raft.base_index or self.committed_in[index] >= term:
                continue  # a leader of an older term may lack what a newer one committed
            mine = raft.entries(index, 1)
            if not mine or mine[0] != entry:
                self.fail(f"leader {node.node_id} of term {term} lacks committed entry {index}")

    def _check_entries(self, node: SimNode, entries: list[IndexedEvent]) -> None:
        raft = node.raft
        for entry in entries:
            key = (entry.index, entry.term)
            known = self.entry_at.setdefault(key, entry)
            if known != entry:
                self.fail(f"two entries at index {entry.index} term {entry.term}")
            prev_term = raft.term_at(entry.index - 1)
            assert prev_term is not None
            if self.prev_term_of.setdefault(key, prev_term) != prev_term:
                self.fail(f"log matching: entry {key} follows different terms on {node.node_id}")

    def _check_applied(self, node: SimNode, entries: list[IndexedEvent]) -> None:
        for entry in entries:
            known = self.committed.setdefault(entry.index, entry)
            if known != entry:
                self.fail(f"{node.node_id} applied a different entry at {entry.index}")
            self.committed_in[entry.index] = min(
                self.committed_in.get(entry.index, node.raft.term), node.raft.term
            )
            if node.raft.role == "leader" and entry.origin_node_id == "client":
                write = self._proposed.get((node.node_id, entry.index))
                if write is not None and write == entry.origin_sequence:
                    self.acknowledged[write] = entry.index

    def check_converged(self) -> None:
        """Every node's snapshot is a committed prefix and its log the same continuation of it."""
        full: dict[int, IndexedEvent] = {}
        last = self.nodes["n0"].raft.last_index
        for node_id, node in self.nodes.items():
            raft = node.raft
            if raft.last_index != last:
                self.fail(f"logs differ after the heal: n0 ends at {last}, {node_id} at {raft.last_index}")
            if raft.commit_index != last:
                self.fail(f"{node_id} committed {raft.commit_index} of {last} after the heal")
            if raft.base_index and self.committed.get(raft.base_index, None) is None:
                self.fail(f"{node_id}'s snapshot at {raft.base_index} is not committed")
            for entry in raft.log:
                if full.setdefault(entry.index, entry) != entry:
                    self.fail(f"logs differ after the heal at {entry.index} ({node_id})")
            disk = node.disk
            if disk.base_index != raft.base_index or disk.log != raft.log:
                self.fail(f"{node_id}'s disk differs from its log after the heal")
        for index, entry in self.committed.items():
            if full.setdefault(index, entry) != entry:
                self.fail(f"the log differs from the committed entry at {index}")
        for write, index in self.acknowledged.items():
            entry = full.get(index)
            if entry is None or entry.origin_sequence != write or entry.origin_node_id != "client":
                self.fail(f"acknowledged write {write} at index {index} is lost")


def run_seed(seed: int, trace: bool = False, raft_class: type[Raft] = Raft) -> Simulation:
    simulation = Simulation(seed, trace=trace, raft_class=raft_class)
    simulation.run()
    return simulation


def main(argv: list[str]) -> int:
    trace = "-v" in argv
    seeds = [int(arg) for arg in argv if arg != "-v"]
    for seed in seeds:
        simulation = run_seed(seed, trace=trace)
        entries = simulation.nodes["n0"].raft.last_index
        faults = simulation.faults
        print(
            f"seed {seed}: {simulation.size} nodes, {faults.total} faults, "
            f"{len(simulation.acknowledged)} writes acknowledged, {entries} entries, "
            f"{faults.compactions} compactions, {faults.snapshots_installed} snapshots installed"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
