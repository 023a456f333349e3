"""Discovery: the pure parsing/table rules, then real mDNS between instances on the loopback interface."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import uuid
from collections.abc import Callable

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from exo.bus.discovery import (
    SERVICE_TYPE,
    DiscoveredPeer,
    Discovery,
    DiscoveryError,
    PeerFound,
    PeerLost,
    PeerTable,
    Rejection,
    choose_address,
    instance_label,
    parse_announcement,
)

GOOD = {b"node_id": b"node-b", b"proto": b"1"}
TAGGED = {**GOOD, b"cluster": b"tag-1"}


def parse(
    properties: dict[bytes, bytes | None],
    addresses: list[str] | None = None,
    port: int | None = 52414,
    cluster_tag: str | None = None,
) -> DiscoveredPeer | Rejection:
    return parse_announcement(
        properties,
        ["198.18.0.2"] if addresses is None else addresses,
        port,
        own_node_id="node-a",
        cluster_tag=cluster_tag,
    )


@pytest.mark.parametrize(
    ("properties", "addresses", "port", "cluster_tag", "expected"),
    [
        ({}, None, 52414, None, ("missing node_id", True)),
        ({b"node_id": None, b"proto": b"1"}, None, 52414, None, ("missing node_id", True)),
        ({b"node_id": b"\xff\xfe", b"proto": b"1"}, None, 52414, None, ("node_id is not UTF-8", True)),
        ({b"node_id": b"", b"proto": b"1"}, None, 52414, None, ("bad node_id: node id is empty", True)),
        ({b"node_id": b"a b", b"proto": b"1"}, None, 52414, None, ("bad node_id", True)),
        ({b"node_id": b"a\x00", b"proto": b"1"}, None, 52414, None, ("bad node_id", True)),
        ({b"node_id": b"x" * 201, b"proto": b"1"}, None, 52414, None, ("bad node_id", True)),
        ({b"node_id": b"node-b"}, None, 52414, None, ("missing protocol version", True)),
        ({b"node_id": b"node-b", b"proto": b"one"}, None, 52414, None, ("protocol version is not", True)),
        ({b"node_id": b"node-b", b"proto": b"-1"}, None, 52414, None, ("protocol version is not", True)),
        ({b"node_id": b"node-b", b"proto": b"9" * 40}, None, 52414, None, ("protocol version is not", True)),
        ({**GOOD, b"cluster": b"bad tag!"}, None, 52414, "tag-1", ("bad cluster tag", True)),
        ({**GOOD, b"cluster": b"\xff"}, None, 52414, "tag-1", ("bad cluster tag", True)),
        (GOOD, None, None, None, ("bad port None", True)),
        (GOOD, None, 0, None, ("bad port 0", True)),
        (GOOD, None, 70000, None, ("bad port 70000", True)),
        (GOOD, [], 52414, None, ("no usable IPv4 address", True)),
        (GOOD, ["0.0.0.0", "224.0.0.251", "garbage", "fe80::1"], 52414, None, ("no usable IPv4", True)),
        ({b"node_id": b"node-a", b"proto": b"1"}, None, 52414, None, ("self", False)),
        ({b"node_id": b"node-b", b"proto": b"2"}, None, 52414, None, ("protocol version 2", False)),
        (GOOD, None, 52414, "tag-1", ("peer announces no cluster tag", False)),
        ({**GOOD, b"cluster": b"tag-2"}, None, 52414, "tag-1", ("peer belongs to another cluster", False)),
        (TAGGED, None, 52414, None, ("peer belongs to a cluster with a secret", False)),
    ],
)
def test_parse_rejects(
    properties: dict[bytes, bytes | None],
    addresses: list[str] | None,
    port: int | None,
    cluster_tag: str | None,
    expected: tuple[str, bool],
) -> None:
    reason, malformed = expected
    result = parse(properties, addresses, port, cluster_tag)
    assert isinstance(result, Rejection)
    assert result.reason.startswith(reason)
    assert result.malformed is malformed


@pytest.mark.parametrize(
    ("properties", "addresses", "cluster_tag", "expected"),
    [
        (GOOD, ["198.18.0.2"], None, DiscoveredPeer("node-b", ("198.18.0.2",), 52414)),
        (TAGGED, ["198.18.0.2"], "tag-1", DiscoveredPeer("node-b", ("198.18.0.2",), 52414)),
        # unknown TXT keys are for later versions; junk addresses are skipped, duplicates merged
        (
            {**GOOD, b"extra": b"x", b"flag": None},
            ["198.18.0.2"],
            None,
            DiscoveredPeer("node-b", ("198.18.0.2",), 52414),
        ),
        (
            GOOD,
            ["garbage", "10.0.0.9", "198.18.0.2", "10.0.0.9"],
            None,
            DiscoveredPeer("node-b", ("10.0.0.9", "198.18.0.2"), 52414),
        ),
        (
            {b"node_id": "nœud-ß".encode(), b"proto": b"1"},
            ["127.0.0.1"],
            None,
            DiscoveredPeer("nœud-ß", ("127.0.0.1",), 52414),
        ),
    ],
)
def test_parse_accepts(
    properties: dict[bytes, bytes | None],
    addresses: list[str],
    cluster_tag: str | None,
    expected: DiscoveredPeer,
) -> None:
    assert parse(properties, addresses, 52414, cluster_tag) == expected


def test_choose_address_prefers_shared_network_then_non_loopback() -> None:
    networks = [ipaddress.IPv4Network("198.18.0.0/24")]
    assert choose_address(["10.0.0.1", "198.18.0.7"], networks) == "198.18.0.7"
    assert choose_address(["127.0.0.1", "10.0.0.5", "10.0.0.1"], networks) == "10.0.0.1"
    assert choose_address(["127.0.0.1"], networks) == "127.0.0.1"


def test_instance_label_is_the_node_id_when_it_is_a_plain_label() -> None:
    assert instance_label("node-0_a") == "node-0_a"
    hashed = instance_label("host.local/1")
    assert hashed.startswith("exo-") and hashed == instance_label("host.local/1")
    assert instance_label("x" * 64) != "x" * 64


def test_peer_table_reports_changes_only() -> None:
    table = PeerTable([ipaddress.IPv4Network("198.18.0.0/24")])
    peer = DiscoveredPeer("node-b", ("198.18.0.2",), 52414)
    assert table.observe("b", peer) == [PeerFound("node-b", "198.18.0.2:52414")]
    assert table.observe("b", peer) == []  # a re-announcement with nothing new
    moved = DiscoveredPeer("node-b", ("198.18.0.3",), 52414)
    assert table.observe("b", moved) == [PeerFound("node-b", "198.18.0.3:52414")]
    assert table.peers() == {"node-b": "198.18.0.3:52414"}
    renamed = DiscoveredPeer("node-c", ("198.18.0.3",), 52414)
    assert table.observe("b", renamed) == [PeerLost("node-b"), PeerFound("node-c", "198.18.0.3:52414")]
    assert table.observe("b", Rejection("peer belongs to another cluster", False)) == [PeerLost("node-c")]
    assert table.observe("b", Rejection("missing node_id", True)) == []
    assert table.remove("b") == []
    assert table.peers() == {}


def test_peer_table_keeps_a_node_announced_under_two_names() -> None:
    table = PeerTable()
    peer = DiscoveredPeer("node-b", ("10.0.0.2",), 1)
    table.observe("b1", peer)
    assert table.observe("b2", peer) == []
    assert table.remove("b1") == []
    assert table.remove("b2") == [PeerLost("node-b")]


@pytest.mark.parametrize(
    ("node_id", "bus_port", "addresses", "cluster_tag", "message"),
    [
        ("", 1, None, None, "node id is empty"),
        ("a b", 1, None, None, "whitespace"),
        ("n", 0, None, None, "bus port 0"),
        ("n", 65536, None, None, "bus port 65536"),
        ("n", 1, [], None, "addresses must be"),
        ("n", 1, ["localhost"], None, "addresses must be"),
        ("n", 1, ["224.0.0.251"], None, "addresses must be"),
        ("n", 1, None, "", "cluster tag"),
        ("n", 1, None, "x" * 65, "cluster tag"),
        ("n", 1, None, "has space", "cluster tag"),
    ],
)
def test_constructor_rejects_bad_arguments(
    node_id: str, bus_port: int, addresses: list[str] | None, cluster_tag: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Discovery(
            node_id, bus_port, lambda _node, _address: None, addresses=addresses, cluster_tag=cluster_tag
        )


# --- real mDNS over loopback (127.0.0.1 only) ---------------------------------------------------------
# Every test uses fresh node ids and its own cluster tag, so concurrent runs on this host never mix.

DEADLINE = 15.0


class Recorder:
    def __init__(self) -> None:
        self.found: dict[str, str] = {}
        self.lost: list[str] = []
        self.changed = asyncio.Event()

    def on_found(self, node_id: str, address: str) -> None:
        self.found[node_id] = address
        self.changed.set()

    def on_lost(self, node_id: str) -> None:
        self.lost.append(node_id)
        self.found.pop(node_id, None)
        self.changed.set()

    async def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        async def poll() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(poll(), DEADLINE)
        except TimeoutError:
            pytest.fail(f"within {DEADLINE}s: {what} (found {self.found}, lost {self.lost})")


async def wait_for_condition(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"within {DEADLINE}s: {what}")
        await asyncio.sleep(0.05)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def loopback(node_id: str, port: int, recorder: Recorder, tag: str) -> Discovery:
    return Discovery(
        node_id, port, recorder.on_found, recorder.on_lost, addresses=["127.0.0.1"], cluster_tag=tag
    )


async def test_two_nodes_find_each_other_and_see_goodbye() -> None:
    tag = unique("t")
    id_a, id_b = unique("a"), unique("b")
    seen_by_a, seen_by_b = Recorder(), Recorder()
    node_a = loopback(id_a, 40001, seen_by_a, tag)
    node_b = loopback(id_b, 40002, seen_by_b, tag)
    try:
        await asyncio.gather(node_a.start(), node_b.start())
        await seen_by_a.wait_until(lambda: id_b in seen_by_a.found, "a finds b")
        await seen_by_b.wait_until(lambda: id_a in seen_by_b.found, "b finds a")
        assert seen_by_a.found == {id_b: "127.0.0.1:40002"}
        assert seen_by_b.found == {id_a: "127.0.0.1:40001"}
        assert node_a.peers() == {id_b: "127.0.0.1:40002"}
        assert node_a.dropped == 0

        await node_b.close()
        assert node_b.state == "closed"
        await seen_by_a.wait_until(lambda: id_b in seen_by_a.lost, "a hears b's goodbye")
        assert id_a not in seen_by_a.found and id_a not in seen_by_a.lost
    finally:
        await asyncio.gather(node_a.close(), node_b.close())


async def test_other_cluster_tags_and_malformed_services_are_ignored() -> None:
    tag = unique("t")
    id_a, id_b, id_other = unique("a"), unique("b"), unique("o")
    seen_by_a = Recorder()
    node_a = loopback(id_a, 40011, seen_by_a, tag)
    node_b = loopback(id_b, 40012, Recorder(), tag)
    other_cluster = loopback(id_other, 40013, Recorder(), unique("other"))
    raw = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    garbage = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{unique('garbage')}.{SERVICE_TYPE}",
        port=40014,
        properties={b"node_id": b"\xff", b"proto": b"x", b"cluster": tag.encode()},
        server=f"{unique('garbage')}.local.",
        addresses=[socket.inet_aton("127.0.0.1")],
    )
    try:
        await asyncio.gather(node_a.start(), node_b.start(), other_cluster.start())
        await raw.async_register_service(garbage)
        await seen_by_a.wait_until(lambda: id_b in seen_by_a.found, "a finds b")
        await wait_for_condition(
            lambda: node_a.rejections["peer belongs to another cluster"] >= 1 and node_a.dropped >= 1,
            "a sees (and ignores) the other cluster and the garbage service",
        )
        assert set(seen_by_a.found) == {id_b}
        assert node_a.rejections["node_id is not UTF-8"] >= 1
    finally:
        await asyncio.gather(node_a.close(), node_b.close(), other_cluster.close(), raw.async_close())


async def test_duplicate_node_id_is_refused() -> None:
    tag, node_id = unique("t"), unique("dup")
    first = loopback(node_id, 40021, Recorder(), tag)
    second = loopback(node_id, 40022, Recorder(), tag)
    try:
        await first.start()
        with pytest.raises(DiscoveryError, match="already announces"):
            await second.start()
        assert second.state == "closed"
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_failing_callback_does_not_stop_discovery() -> None:
    tag = unique("t")
    id_a, id_b, id_c = unique("a"), unique("b"), unique("c")
    calls: list[str] = []
    found = asyncio.Event()

    def explode(node_id: str, address: str) -> None:
        calls.append(node_id)
        if len(set(calls)) == 2:
            found.set()
        raise RuntimeError("callback bug")

    node_a = Discovery(id_a, 40031, explode, addresses=["127.0.0.1"], cluster_tag=tag)
    others = [loopback(id_b, 40032, Recorder(), tag), loopback(id_c, 40033, Recorder(), tag)]
    try:
        await asyncio.gather(node_a.start(), *(node.start() for node in others))
        await asyncio.wait_for(found.wait(), DEADLINE)
        assert set(calls) == {id_b, id_c}
    finally:
        await asyncio.gather(node_a.close(), *(node.close() for node in others))


async def test_lifecycle_transitions() -> None:
    never_started = Discovery(unique("n"), 1, lambda _node, _address: None, addresses=["127.0.0.1"])
    await never_started.close()
    assert never_started.state == "closed"
    with pytest.raises(RuntimeError, match="from closed to starting"):
        await never_started.start()

    node = loopback(unique("n"), 40041, Recorder(), unique("t"))
    try:
        await node.start()
        assert node.state == "running"
        with pytest.raises(RuntimeError, match="from running to starting"):
            await node.start()
    finally:
        await node.close()
        await node.close()  # closing twice is harmless
    assert node.state == "closed"


async def test_unusable_interface_address_is_a_clear_error() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here, so the mDNS sockets cannot bind to it.
    node = Discovery(unique("n"), 1, lambda _node, _address: None, addresses=["192.0.2.1"])
    with pytest.raises(DiscoveryError, match="cannot open mDNS sockets"):
        await node.start()
    assert node.state == "closed"


def test_peer_table_falls_back_to_the_other_name_of_a_node() -> None:
    table = PeerTable()
    assert table.observe("b1", DiscoveredPeer("node-b", ("10.0.0.2",), 1)) == [
        PeerFound("node-b", "10.0.0.2:1")
    ]
    assert table.observe("b2", DiscoveredPeer("node-b", ("10.0.0.3",), 1)) == [
        PeerFound("node-b", "10.0.0.3:1")
    ]
    assert table.remove("b2") == [PeerFound("node-b", "10.0.0.2:1")]
    assert table.peers() == {"node-b": "10.0.0.2:1"}


async def test_cancelled_start_releases_everything() -> None:
    node = loopback(unique("n"), 40051, Recorder(), unique("t"))
    # Probing waits at least 150 ms before its first packet, so 50 ms always lands inside start().
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(node.start(), 0.05)
    assert node.state == "closed"
