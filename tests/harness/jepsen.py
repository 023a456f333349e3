"""Jepsen-style checks of a running exo cluster, from the outside: the HTTP API and the processes only.

Writers send cluster changes through each node's API while a nemesis cuts the network or pauses and
kills processes, and record every answer: `ok` (HTTP 200: acknowledged), `fail` (refused for sure: a
4xx or a 503) or `info` (no answer: a timeout, a broken connection; it may or may not have happened),
as Jepsen classifies operations. Observers sample each node's `/node_status` (who claims to lead, in
which term) and every event it serves at `/events`. After the faults stop and the network heals,
`check` says what went wrong: an acknowledged write missing from a node's log, two masters in one
term, logs that differ, an event served at an index and later replaced there. Nothing here knows how
the cluster elects or commits, so it checks any implementation.

A write is `POST /place_instance` of the synthetic `exo-tiny` model (its acknowledgement is an
`InstanceCreated` in the log, with the answered instance id), then `DELETE /instance/{id}` of it (an
`InstanceDeleted`), so at most one instance per writer is alive at a time.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tests.harness.netns_cluster import ExoNode, NetnsExoCluster

MODEL = "exo-tiny"
WRITE_TIMEOUT_SECONDS = 5.0  # longer than a node's wait for a quorum (2 s) and an election
OBSERVE_TIMEOUT_SECONDS = 0.5  # a paused node must not hold up the observer for long

Outcome = Literal["ok", "fail", "info"]


class ApiNode(Protocol):
    """What the clients use of a node (`ExoNode` in tests/harness/netns_cluster.py)."""

    @property
    def node_id(self) -> str: ...

    def request(
        self, method: str, path: str, body: object = None, timeout: float = 2.0
    ) -> tuple[int, bytes]: ...

    def get(self, path: str, timeout: float = 2.0) -> Any: ...


@dataclass(frozen=True)
class Op:
    """One operation as the client saw it; times are seconds since the history started."""

    process: str  # the writer (named after the node it talks to) or "nemesis"
    kind: str  # "place", "delete", or the nemesis's action
    instance_id: str | None
    started: float
    ended: float
    outcome: Outcome
    detail: str = ""

    def line(self) -> str:
        target = f" {self.instance_id}" if self.instance_id else ""
        detail = f" ({self.detail})" if self.detail else ""
        when = f"{self.started:7.2f}-{self.ended:6.2f}"
        return f"{when} {self.process:>9} {self.kind}{target} {self.outcome}{detail}"


class History:
    """Every operation of one run, in the order they ended (thread-safe)."""

    def __init__(self) -> None:
        self.started_at = time.monotonic()
        self.ops: list[Op] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.started_at

    def record(self, op: Op) -> None:
        with self._lock:
            self.ops.append(op)

    def nemesis(self, action: str) -> None:
        at = self.now()
        self.record(Op("nemesis", action, None, at, at, "ok"))

    def acknowledged(self, kind: str) -> list[Op]:
        with self._lock:
            return [op for op in self.ops if op.kind == kind and op.outcome == "ok"]

    def counts(self) -> dict[str, int]:
        """`place ok: 12`-style counts of the writers' outcomes."""
        counts: dict[str, int] = defaultdict(int)
        with self._lock:
            for op in self.ops:
                if op.process != "nemesis":
                    counts[f"{op.kind} {op.outcome}"] += 1
        return dict(sorted(counts.items()))


class Writer(threading.Thread):
    """One client on one node: place an instance, delete it once placed, pause, again, until stopped.
    A delete that was not acknowledged is retried before the next place."""

    def __init__(self, node: ApiNode, history: History, stop: threading.Event, pause: float) -> None:
        super().__init__(name=f"writer-{node.node_id}", daemon=True)
        self.node = node
        self.history = history
        self.stop = stop
        self.pause = pause
        self.unsettled: list[str] = []  # placed, not yet deleted for sure

    def run(self) -> None:
        while not self.stop.is_set():
            self.step()
            self.stop.wait(self.pause)  # pacing, not synchronisation

    def step(self) -> Op:
        """One write: delete the oldest unsettled instance, or place a new one."""
        if self.unsettled:
            return self._write("delete", "DELETE", f"/instance/{self.unsettled[0]}", None, self.unsettled[0])
        return self._write("place", "POST", "/place_instance", {"model_id": MODEL, "min_nodes": 1}, None)

    def _write(self, kind: str, method: str, path: str, body: object, instance_id: str | None) -> Op:
        started = self.history.now()
        outcome: Outcome
        try:
            status, data = self.node.request(method, path, body, timeout=WRITE_TIMEOUT_SECONDS)
        except OSError as error:  # NodeApiError is one
            # Refused at connect: nothing was sent, so nothing happened. Anything else: unknown.
            refused = isinstance(error.__cause__ or error, ConnectionRefusedError)
            outcome, detail = ("fail", "connection refused") if refused else ("info", repr(error)[:80])
        else:
            detail = f"{status}"
            if status == 200:
                outcome = "ok"
                instance_id = str(json.loads(data)["instance_id"])
            elif 400 <= status < 500 or status == 503:
                outcome = "fail"
                detail = f"{status} {_error_code(data)}"
            else:
                outcome = "info"
        op = Op(self.name, kind, instance_id, started, self.history.now(), outcome, detail)
        self.history.record(op)
        if kind == "place" and instance_id is not None and outcome == "ok":
            self.unsettled.append(instance_id)
        elif kind == "delete" and instance_id is not None and (outcome == "ok" or detail.startswith("404")):
            self.unsettled.remove(instance_id)
        return op


def _error_code(data: bytes) -> str:
    try:
        document = json.loads(data)
    except ValueError:
        return data[:80].decode(errors="replace")
    error = document.get("error", document) if isinstance(document, dict) else document
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or error.get("message", ""))[:80]
    return str(error)[:80]


@dataclass
class Observation:
    """What one node said during the run."""

    node_id: str
    leading: dict[int, float] = field(default_factory=dict[int, float])  # term -> first time it said master
    served: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])  # /events as first served
    samples: int = 0
    unanswered: int = 0


class Observer(threading.Thread):
    """Samples one node's `/node_status` (`is_master`, `term`) and the new tail of its `/events`."""

    def __init__(self, node: ApiNode, history: History, stop: threading.Event, interval: float) -> None:
        super().__init__(name=f"observer-{node.node_id}", daemon=True)
        self.node = node
        self.history = history
        self.stop = stop
        self.interval = interval
        self.observation = Observation(node.node_id)

    def run(self) -> None:
        seen = self.observation
        while not self.stop.is_set():
            try:
                status = self.node.get("/node_status", timeout=OBSERVE_TIMEOUT_SECONDS)
                if status["is_master"]:
                    seen.leading.setdefault(int(status["term"]), self.history.now())
                page = self.node.get(f"/events?since={len(seen.served)}", timeout=OBSERVE_TIMEOUT_SECONDS)
            except (OSError, ValueError, KeyError):
                seen.unanswered += 1
            else:
                seen.samples += 1
                # Only a page that continues what was served: a node that dropped its tail serves
                # new events at higher indices, checked against the final log by `check`.
                if page and page[0]["index"] == len(seen.served) + 1:
                    seen.served.extend(page)
            self.stop.wait(self.interval)


class Clients:
    """A writer and an observer per node, started together and stopped together."""

    def __init__(self, cluster: NetnsExoCluster, history: History, *, pause: float, interval: float) -> None:
        self.stop_writing = threading.Event()
        self.stop_observing = threading.Event()
        self.writers = [Writer(node, history, self.stop_writing, pause) for node in cluster.nodes]
        self.observers = [Observer(node, history, self.stop_observing, interval) for node in cluster.nodes]

    def start(self) -> None:
        for thread in (*self.observers, *self.writers):
            thread.start()

    def stop_writers(self) -> None:
        self.stop_writing.set()
        for writer in self.writers:
            writer.join(WRITE_TIMEOUT_SECONDS + 10)

    def stop_observers(self) -> None:
        self.stop_observing.set()
        for observer in self.observers:
            observer.join(OBSERVE_TIMEOUT_SECONDS * 2 + 10)

    def observations(self) -> list[Observation]:
        return [observer.observation for observer in self.observers]


def identical_logs(nodes: Sequence[ExoNode]) -> dict[str, list[dict[str, Any]]] | None:
    """Every node's whole log when all are the same, else None (poll it with a deadline)."""
    indexes = {node.get("/state")["last_event_index"] for node in nodes}
    if len(indexes) != 1:
        return None
    logs = {node.node_id: node.events() for node in nodes}
    first = next(iter(logs.values()))
    return logs if all(log == first for log in logs.values()) else None


@dataclass(frozen=True)
class Verdict:
    """The outcome of `check`: counts for the record and each problem found, in words."""

    acknowledged: dict[str, int]
    lost: dict[str, list[str]]  # node -> acknowledged writes missing from its log ("place i-..")
    masters_by_term: dict[int, list[str]]
    problems: list[str]

    def lost_writes(self) -> set[str]:
        """Every acknowledged write missing from at least one node's log."""
        return {write for writes in self.lost.values() for write in writes}

    def summary(self) -> str:
        acknowledged = ", ".join(f"{kind} {count}" for kind, count in self.acknowledged.items())
        return (
            f"acknowledged: {acknowledged}; lost: {len(self.lost_writes())} "
            f"(missing from {len(self.lost)} node logs); problems: {len(self.problems)}"
        )


def check(
    history: History, observations: Sequence[Observation], logs: dict[str, list[dict[str, Any]]]
) -> Verdict:
    """Jepsen's questions about a run: the history of acknowledgements against each node's final log
    (`logs`, node id -> GET /events from 0) and what the observers saw during the run."""
    problems: list[str] = []
    acknowledged = {kind: history.acknowledged(kind) for kind in ("place", "delete")}
    wanted = {"place": "InstanceCreated", "delete": "InstanceDeleted"}
    lost: dict[str, list[str]] = {}
    for node_id, log in logs.items():
        present = {(event["event"]["type"], event["event"].get("instance_id")) for event in log}
        missing = [
            f"{kind} {op.instance_id}"
            for kind, ops in acknowledged.items()
            for op in ops
            if (wanted[kind], op.instance_id) not in present
        ]
        if missing:
            lost[node_id] = missing
            problems.append(
                f"{node_id}'s log lacks {len(missing)} acknowledged writes: {', '.join(missing[:8])}"
            )

    # Two kinds of evidence: a node saying it is master in a term (/node_status), and a
    # MasterElected in a log, served during the run or in a final log.
    claimed: dict[int, set[str]] = defaultdict(set)
    elected: dict[int, set[str]] = defaultdict(set)
    for observation in observations:
        for term in observation.leading:
            claimed[term].add(observation.node_id)
    served_anywhere = [event for observation in observations for event in observation.served]
    for event in served_anywhere + [event for log in logs.values() for event in log]:
        if event["event"]["type"] == "MasterElected":
            elected[int(event["event"]["term"])].add(str(event["event"]["node_id"]))
    masters = {term: claimed[term] | elected[term] for term in sorted(claimed.keys() | elected.keys())}
    for term, nodes in masters.items():
        if len(nodes) > 1:
            problems.append(
                f"two masters in term {term}: {sorted(nodes)} (said so at /node_status: "
                f"{sorted(claimed[term])}; MasterElected in a log: {sorted(elected[term])})"
            )

    problems.extend(_log_differences(logs))
    for observation in observations:
        final = logs.get(observation.node_id, [])
        for served in observation.served:
            index = served["index"]
            now = final[index - 1] if index <= len(final) else None
            if now != served:
                problems.append(
                    f"{observation.node_id} served index {index} as {_short(served)}, its log now has "
                    f"{_short(now) if now else 'nothing there'}"
                )
                break  # the first replaced index says it; the rest follow from it
    return Verdict(
        {kind: len(ops) for kind, ops in acknowledged.items()},
        lost,
        {term: sorted(nodes) for term, nodes in masters.items()},
        problems,
    )


def _log_differences(logs: dict[str, list[dict[str, Any]]]) -> list[str]:
    items = list(logs.items())
    if not items:
        return []
    first_id, first = items[0]
    problems: list[str] = []
    for node_id, log in items[1:]:
        if log == first:
            continue
        index = next(
            (i for i, (a, b) in enumerate(zip(first, log, strict=False)) if a != b), min(len(first), len(log))
        )
        problems.append(
            f"logs differ: {first_id} has {len(first)} events, {node_id} {len(log)}; first difference at "
            f"index {index + 1}: {_short(first[index]) if index < len(first) else 'nothing'} vs "
            f"{_short(log[index]) if index < len(log) else 'nothing'}"
        )
    return problems


def _short(event: dict[str, Any]) -> str:
    body = event["event"]
    detail = body.get("instance_id") or body.get("node_id") or ""
    return f"t{event['term']} {body['type']} {detail}".rstrip()
