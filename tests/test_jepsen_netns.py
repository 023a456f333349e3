"""Jepsen-style runs (issue 18): three real nodes in network namespaces, clients writing through every
node's API while the network is cut or the master paused or killed, then the checks of
tests/harness/jepsen.py once the faults stop and the network heals: no acknowledged write lost, no
two masters in one term, identical logs, no event served and later replaced.

Each schedule starts a fresh cluster. The fixed durations are the faults themselves (how long a
partition lasts); every wait for the cluster is a poll with a deadline. Each run prints its schedule,
the history's counts and the verdict (`pytest -s` shows them; docs/testing.md has the record).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.jepsen import Clients, History, Op, Verdict, check, identical_logs
from tests.harness.netns import requires_netns
from tests.harness.netns_cluster import ExoNode, NetnsExoCluster

pytestmark = pytest.mark.netns

SERVING_SECONDS = 45.0  # interpreter start-up of three nodes on two busy cores
FORM_SECONDS = 15.0
CONVERGE_SECONDS = 15.0  # after the heal, until every node serves the same log
BEFORE_FAULT_SECONDS = 1.0  # writes on the healthy cluster first
FAULT_SECONDS = 8.0  # how long a partition, a pause or a dead master lasts
AFTER_HEAL_SECONDS = 2.5  # writes go on after the heal: two masters meeting would show here
FLAP_PERIOD_SECONDS = 0.8
WRITE_PAUSE_SECONDS = 0.5  # per writer, between its writes: runners start for every placement
OBSERVE_SECONDS = 0.1
SEED = 18


@dataclass(frozen=True)
class Roles:
    master: ExoNode
    followers: list[ExoNode]


Nemesis = Callable[[NetnsExoCluster, Roles, History], None]


def partition_master(cluster: NetnsExoCluster, roles: Roles, history: History) -> None:
    """1|2: the master alone on one side, both followers on the other."""
    cluster.network.partition([roles.master.host], [node.host for node in roles.followers])
    history.nemesis(f"partition [{roles.master.node_id}] | {[node.node_id for node in roles.followers]}")
    time.sleep(FAULT_SECONDS)  # the fault itself
    cluster.network.heal()
    history.nemesis("heal")


def partition_follower(cluster: NetnsExoCluster, roles: Roles, history: History) -> None:
    """1|2: one follower alone, the master with the other follower."""
    alone, *rest = roles.followers
    majority = [roles.master, *rest]
    cluster.network.partition([alone.host], [node.host for node in majority])
    history.nemesis(f"partition [{alone.node_id}] | {[node.node_id for node in majority]}")
    time.sleep(FAULT_SECONDS)
    cluster.network.heal()
    history.nemesis("heal")


def flapping(cluster: NetnsExoCluster, roles: Roles, history: History) -> None:
    """Every FLAP_PERIOD_SECONDS a seeded choice: one node cut off from the other two, or all healed."""
    rng = random.Random(SEED)
    deadline = time.monotonic() + FAULT_SECONDS
    while time.monotonic() < deadline:
        choice = rng.choice([None, *cluster.nodes])
        if choice is None:
            cluster.network.heal()
            history.nemesis("heal")
        else:
            cluster.network.partition(
                [choice.host], [node.host for node in cluster.nodes if node is not choice]
            )
            history.nemesis(f"partition [{choice.node_id}] | the other two")
        time.sleep(FLAP_PERIOD_SECONDS)
    cluster.network.heal()
    history.nemesis("heal")


def pause_master(cluster: NetnsExoCluster, roles: Roles, history: History) -> None:
    """SIGSTOP the master (and its runners), SIGCONT it FAULT_SECONDS later."""
    process = roles.master.process
    assert process is not None
    os.killpg(process.pid, signal.SIGSTOP)
    history.nemesis(f"SIGSTOP {roles.master.node_id}")
    try:
        time.sleep(FAULT_SECONDS)
    finally:
        os.killpg(process.pid, signal.SIGCONT)
    history.nemesis(f"SIGCONT {roles.master.node_id}")


def kill_master(cluster: NetnsExoCluster, roles: Roles, history: History) -> None:
    """kill -9 the master (and its runners), start it again FAULT_SECONDS later on the same data."""
    roles.master.kill(signal.SIGKILL)
    history.nemesis(f"kill -9 {roles.master.node_id}")
    time.sleep(FAULT_SECONDS)
    roles.master.start()
    history.nemesis(f"restart {roles.master.node_id}")
    cluster.wait_serving(SERVING_SECONDS, [roles.master])


SCHEDULES: dict[str, Nemesis] = {
    "partition-master": partition_master,
    "partition-follower": partition_follower,
    "flapping": flapping,
    "pause-master": pause_master,
    "kill-master": kill_master,
}


def run_schedule(cluster: NetnsExoCluster, name: str, nemesis: Nemesis) -> Verdict:
    cluster.start_all()
    cluster.wait_serving(SERVING_SECONDS)
    formed = cluster.wait_formed(FORM_SECONDS)
    master = cluster.node(formed["master_node_id"])
    roles = Roles(master, [node for node in cluster.nodes if node is not master])
    history = History()
    clients = Clients(cluster, history, pause=WRITE_PAUSE_SECONDS, interval=OBSERVE_SECONDS)
    clients.start()
    try:
        time.sleep(BEFORE_FAULT_SECONDS)  # the healthy part of the schedule
        nemesis(cluster, roles, history)
        time.sleep(AFTER_HEAL_SECONDS)
    finally:
        clients.stop_writers()
    try:
        logs = cluster.wait_until(
            lambda: identical_logs(cluster.nodes), CONVERGE_SECONDS, "identical logs on every node"
        )
        converged = True
    except AssertionError:
        # Judged below all the same: the verdict names what differs, which says more.
        logs = {node.node_id: node.events() for node in cluster.nodes}
        converged = False
    clients.stop_observers()
    verdict = check(history, clients.observations(), logs)
    report = [
        f"\n=== jepsen {name}: started with master {master.node_id} (term {formed['term']})",
        *(op.line() for op in history.ops if op.process == "nemesis"),
        f"writes: {history.counts()}",
        f"masters by term: {verdict.masters_by_term}",
        f"logs converged within {CONVERGE_SECONDS:g}s: {converged}; {verdict.summary()}",
        *(f"PROBLEM: {problem}" for problem in verdict.problems),
        *(f"lost write: {op.line()}" for op in lost_ops(history, verdict)),
    ]
    sys.stdout.write("\n".join(report) + "\n")
    return verdict


def lost_ops(history: History, verdict: Verdict) -> list[Op]:
    """The acknowledgements behind the lost writes: who answered 200, and when."""
    lost = verdict.lost_writes()
    return [op for op in history.ops if op.outcome == "ok" and f"{op.kind} {op.instance_id}" in lost]


@requires_netns
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_jepsen_schedule_loses_no_acknowledged_write(tmp_path: Path, name: str) -> None:
    with NetnsExoCluster(tmp_path, 3) as cluster:
        verdict = run_schedule(cluster, name, SCHEDULES[name])
        assert sum(verdict.acknowledged.values()) > 0, "no write was acknowledged: nothing was tested"
        assert not verdict.problems, "\n".join([verdict.summary(), *verdict.problems])
