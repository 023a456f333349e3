"""Discovery between real network namespaces (mDNS only, no static peers), and the harness's own checks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import netns
from tests.harness.netns import (
    REPO_ROOT,
    LineWatcher,
    NetnsCluster,
    NetnsHost,
    ip,
    python_env,
    requires_netns,
    start_tcp_listener,
    start_tcp_prober,
)

pytestmark = pytest.mark.netns

DEADLINE = 20.0
PEER_SCRIPT = str(REPO_ROOT / "tests" / "harness" / "discovery_peer.py")


class Peer:
    """One discovery_peer.py process in a namespace, read as JSON events."""

    def __init__(self, host: NetnsHost, node_id: str, bus_port: int, cluster_tag: str | None = None) -> None:
        argv = [sys.executable, PEER_SCRIPT, "--node-id", node_id, "--bus-port", str(bus_port)]
        if cluster_tag is not None:
            argv += ["--cluster-tag", cluster_tag]
        self.process = host.run(argv, python_env())
        assert self.process.stdout is not None
        self.watcher = LineWatcher(self.process.stdout)
        self.events: list[dict[str, Any]] = []

    def wait(self, what: str, **expected: Any) -> dict[str, Any]:
        """The first event (already read or still to come) with these fields."""
        return self._wait(what, lambda event: all(event.get(key) == value for key, value in expected.items()))

    def wait_ignored(self, reason: str, at_least: int) -> None:
        self._wait(
            f"{at_least} x ignored {reason!r}",
            lambda event: event.get("reason") == reason and event.get("count", 0) >= at_least,
        )

    def _wait(self, what: str, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        for event in self.events:
            if condition(event):
                return event

        def matches(line: str) -> bool:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                return False  # a traceback or warning: kept in watcher.lines for the failure message
            self.events.append(event)
            return condition(event)

        return json.loads(self.watcher.wait_for(matches, DEADLINE, what))

    def found(self) -> set[str]:
        return {event["node_id"] for event in self.events if event.get("event") == "found"}


@requires_netns
def test_two_hosts_find_each_other_through_mdns_alone() -> None:
    with NetnsCluster(2) as cluster:
        host_a, host_b = cluster.hosts
        peer_a = Peer(host_a, "node-a", 52414)
        peer_b = Peer(host_b, "node-b", 52415)
        assert peer_a.wait("start", event="started")["addresses"] == [cluster.address(host_a)]
        assert peer_b.wait("start", event="started")["addresses"] == [cluster.address(host_b)]

        found_by_a = peer_a.wait("a finds b", event="found", node_id="node-b")
        found_by_b = peer_b.wait("b finds a", event="found", node_id="node-a")
        assert found_by_a["address"] == f"{host_b.address}:52415"
        assert found_by_b["address"] == f"{host_a.address}:52414"

        # a clean stop says goodbye, so the other side hears of it at once rather than after the TTL
        peer_b.process.send_signal(signal.SIGTERM)
        peer_a.wait("a hears b leave", event="lost", node_id="node-b")
        assert peer_b.process.wait(timeout=DEADLINE) == 0
        assert peer_a.found() == {"node-b"}


@requires_netns
def test_different_cluster_tags_form_separate_clusters_on_one_wire() -> None:
    with NetnsCluster(4) as cluster:
        tags = {"red-0": "red", "red-1": "red", "blue-0": "blue", "blue-1": "blue"}
        peers = {
            node_id: Peer(host, node_id, 52414, tag)
            for host, (node_id, tag) in zip(cluster.hosts, tags.items(), strict=True)
        }
        partners = {"red-0": "red-1", "red-1": "red-0", "blue-0": "blue-1", "blue-1": "blue-0"}
        for node_id, peer in peers.items():
            peer.wait(f"{node_id} finds its partner", event="found", node_id=partners[node_id])
            # positive proof that both nodes of the other cluster were heard, and turned away
            peer.wait_ignored("peer belongs to another cluster", at_least=2)
        for node_id, peer in peers.items():
            assert peer.found() == {partners[node_id]}, node_id


@requires_netns
def test_link_down_cuts_a_host_off_and_link_up_restores_it() -> None:
    with NetnsCluster(2) as cluster:
        host_a, host_b = cluster.hosts
        start_tcp_listener(host_b, 7000)
        prober = start_tcp_prober(host_a, host_b.address, 7000)
        prober.wait_for(lambda line: line == "reachable", DEADLINE, "first connect")

        cluster.link_down(host_b)
        prober.wait_for(lambda line: line == "unreachable", DEADLINE, "connect failing after link_down")
        assert "NO-CARRIER" in ip("-n", host_b.namespace, "link", "show", "eth0")

        cluster.link_up(host_b)
        prober.wait_for(lambda line: line == "reachable", DEADLINE, "connect working after link_up")
        assert "NO-CARRIER" not in ip("-n", host_b.namespace, "link", "show", "eth0")


@requires_netns
def test_partition_separates_groups_and_heal_joins_them() -> None:
    with NetnsCluster(3) as cluster:
        host_a, host_b, host_c = cluster.hosts
        start_tcp_listener(host_b, 7000)
        start_tcp_listener(host_c, 7000)
        to_b = start_tcp_prober(host_a, host_b.address, 7000)
        to_b.wait_for(lambda line: line == "reachable", DEADLINE, "a reaches b")

        cluster.partition([host_a], [host_b])
        to_b.wait_for(lambda line: line == "unreachable", DEADLINE, "a cut off from b")
        # c was named in no group, so it stays with the first one; links stay up in a partition
        to_c = start_tcp_prober(host_a, host_c.address, 7000)
        assert to_c.wait_for(lambda _line: True, DEADLINE, "a probes c") == "reachable"
        assert "NO-CARRIER" not in ip("-n", host_b.namespace, "link", "show", "eth0")

        cluster.heal()
        to_b.wait_for(lambda line: line == "reachable", DEADLINE, "a reaches b after heal")


@requires_netns
def test_partition_rejects_bad_groups() -> None:
    with NetnsCluster(2) as cluster:
        with pytest.raises(ValueError, match="at least two"):
            cluster.partition([0, 1])
        with pytest.raises(ValueError, match="at least two"):
            cluster.partition([0], [])
        with pytest.raises(ValueError, match="only one"):
            cluster.partition([0], [0, 1])


@requires_netns
def test_kill_and_exit_leave_nothing_behind() -> None:
    with NetnsCluster(2) as cluster:
        host = cluster.hosts[0]
        # a child that starts its own grandchild: kill must reach both
        process = host.run(["sh", "-c", "sleep 300 & sleep 300; wait"])
        spare = cluster.hosts[1].run(["sleep", "300"])
        host.kill(signal.SIGKILL)
        assert process.wait(timeout=DEADLINE) == -signal.SIGKILL
        assert host.pids() == []
        assert spare.poll() is None  # the other host is untouched
        namespaces = [cluster.switch, *(host.namespace for host in cluster.hosts)]
    listed = ip("netns", "list")
    assert not any(namespace in listed.split() for namespace in namespaces)
    assert spare.poll() is not None


@requires_netns
def test_stale_namespaces_of_dead_runs_are_swept() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"exo-{dead.pid}-0-h0"
    ip("netns", "add", stale)
    try:
        with NetnsCluster(1):
            assert stale not in ip("netns", "list").split()
    finally:
        if stale in ip("netns", "list").split():
            ip("netns", "delete", stale)


def test_cluster_size_is_checked() -> None:
    with pytest.raises(ValueError, match="n_hosts"):
        NetnsCluster(0)


def test_skip_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    check = netns.netns_unavailable_reason.__wrapped__
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "need root" in (check() or "")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda _name: None)
    assert "iproute2" in (check() or "")


def test_a_cluster_without_namespace_support_fails_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    # What EXO_REQUIRE_NETNS=1 relies on: a test that is not skipped fails loudly instead of passing.
    monkeypatch.setattr(netns, "netns_unavailable_reason", lambda: "no netns here")
    with pytest.raises(netns.NetnsError, match="no netns here"), NetnsCluster(1):
        pass
