"""mDNS discovery: announce this node's bus port as `_exo._tcp.local.` and report the other nodes found.

Pure part: `parse_announcement` turns what a peer announced into a `DiscoveredPeer` or a
`Rejection`, and `PeerTable` turns a stream of those into found/lost decisions. `Discovery` is
the thin zeroconf shell around them.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import psutil
from zeroconf import IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_exo._tcp.local."
PROTOCOL_VERSION = 1
TXT_NODE_ID = b"node_id"
TXT_PROTOCOL = b"proto"
TXT_CLUSTER = b"cluster"
# A TXT entry is at most 255 bytes, "node_id=" included.
MAX_NODE_ID_BYTES = 200
RESOLVE_TIMEOUT_MS = 3000
# zeroconf's default TTL for the service records is 75 minutes; a node killed without a goodbye should
# drop out of its peers' tables within minutes (browsers re-query at 80% of the TTL and expire the rest).
ANNOUNCEMENT_TTL_SECONDS = 120
# Announcements name the services to resolve; a flood of fake names must not grow tasks without bound.
MAX_PENDING_RESOLVES = 256

_CLUSTER_TAG = re.compile(r"[0-9A-Za-z_-]{1,64}")
_SAFE_INSTANCE = re.compile(r"[0-9A-Za-z_-]{1,63}")


class DiscoveryError(Exception):
    """Discovery could not start (no address to announce, socket error, node id already announced)."""


def node_id_problem(node_id: str) -> str | None:
    """Why `node_id` can't be announced, or None when it can."""
    if not node_id:
        return "node id is empty"
    if len(node_id.encode()) > MAX_NODE_ID_BYTES:
        return f"node id is longer than {MAX_NODE_ID_BYTES} bytes"
    if not node_id.isprintable() or any(character.isspace() for character in node_id):
        return "node id has whitespace or control characters"
    return None


def instance_label(node_id: str) -> str:
    """The DNS-SD instance label for a node: the id itself when it is a plain label, else a stable hash."""
    if _SAFE_INSTANCE.fullmatch(node_id):
        return node_id
    return "exo-" + hashlib.sha256(node_id.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class DiscoveredPeer:
    node_id: str
    addresses: tuple[str, ...]
    port: int


@dataclass(frozen=True)
class Rejection:
    """Why an announcement was ignored; `malformed` ones count as dropped, the rest are someone else's."""

    reason: str
    malformed: bool


def _usable_ipv4(text: str) -> bool:
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return not (address.is_unspecified or address.is_multicast or address == ipaddress.IPv4Address(2**32 - 1))


def parse_announcement(
    properties: Mapping[bytes, bytes | None],
    addresses: Sequence[str],
    port: int | None,
    *,
    own_node_id: str,
    cluster_tag: str | None,
) -> DiscoveredPeer | Rejection:
    """Decide what one resolved `_exo._tcp` service means to this node."""
    raw_node_id = properties.get(TXT_NODE_ID)
    if raw_node_id is None:
        return Rejection("missing node_id", malformed=True)
    try:
        node_id = raw_node_id.decode()
    except UnicodeDecodeError:
        return Rejection("node_id is not UTF-8", malformed=True)
    problem = node_id_problem(node_id)
    if problem is not None:
        return Rejection(f"bad node_id: {problem}", malformed=True)
    raw_version = properties.get(TXT_PROTOCOL)
    if raw_version is None:
        return Rejection("missing protocol version", malformed=True)
    if not raw_version.isdigit() or len(raw_version) > 6:
        return Rejection("protocol version is not a number", malformed=True)
    raw_tag = properties.get(TXT_CLUSTER)
    peer_tag: str | None = None
    if raw_tag is not None:
        peer_tag = raw_tag.decode("ascii", errors="replace")
        if not _CLUSTER_TAG.fullmatch(peer_tag):
            return Rejection("bad cluster tag", malformed=True)
    if port is None or not 0 < port < 65536:
        return Rejection(f"bad port {port}", malformed=True)
    usable = tuple(sorted({address for address in addresses if _usable_ipv4(address)}))
    if not usable:
        return Rejection("no usable IPv4 address", malformed=True)

    if node_id == own_node_id:
        return Rejection("self", malformed=False)
    if int(raw_version) != PROTOCOL_VERSION:
        return Rejection(f"protocol version {int(raw_version)} (this node speaks {PROTOCOL_VERSION})", False)
    if peer_tag != cluster_tag:
        if cluster_tag is None:
            return Rejection("peer belongs to a cluster with a secret", malformed=False)
        if peer_tag is None:
            return Rejection("peer announces no cluster tag", malformed=False)
        return Rejection("peer belongs to another cluster", malformed=False)
    return DiscoveredPeer(node_id=node_id, addresses=usable, port=port)


def choose_address(addresses: Sequence[str], local_networks: Sequence[ipaddress.IPv4Network]) -> str:
    """Prefer an address on a network this host is on, then any non-loopback one; stable order otherwise."""

    def rank(text: str) -> tuple[int, int]:
        address = ipaddress.IPv4Address(text)
        if address.is_loopback:
            return (2, int(address))
        on_link = any(address in network for network in local_networks)
        return (0 if on_link else 1, int(address))

    return min(addresses, key=rank)


@dataclass(frozen=True)
class PeerFound:
    node_id: str
    address: str  # HOST:PORT of the peer's bus (ROUTER) socket


@dataclass(frozen=True)
class PeerLost:
    node_id: str


class PeerTable:
    """Which service stands for which peer; reports a node when it appears, moves, or is gone."""

    def __init__(self, local_networks: Sequence[ipaddress.IPv4Network] = ()) -> None:
        self.local_networks = tuple(local_networks)
        self._by_service: dict[str, PeerFound] = {}
        self._reported: dict[str, str] = {}  # node id -> address last given to the callbacks

    def peers(self) -> dict[str, str]:
        return dict(self._reported)

    def observe(self, service_name: str, result: DiscoveredPeer | Rejection) -> list[PeerFound | PeerLost]:
        if isinstance(result, Rejection):
            return self.remove(service_name)
        host = choose_address(result.addresses, self.local_networks)
        found = PeerFound(result.node_id, f"{host}:{result.port}")
        previous = self._by_service.get(service_name)
        decisions: list[PeerFound | PeerLost] = []
        if previous is not None and previous.node_id != found.node_id:
            decisions.extend(self.remove(service_name))
        self._by_service[service_name] = found
        if self._reported.get(found.node_id) != found.address:
            self._reported[found.node_id] = found.address
            decisions.append(found)
        return decisions

    def remove(self, service_name: str) -> list[PeerFound | PeerLost]:
        previous = self._by_service.pop(service_name, None)
        if previous is None:
            return []
        remaining = [found for found in self._by_service.values() if found.node_id == previous.node_id]
        if not remaining:
            del self._reported[previous.node_id]
            return [PeerLost(previous.node_id)]
        if self._reported[previous.node_id] == previous.address:
            self._reported[previous.node_id] = remaining[0].address
            return [remaining[0]] if remaining[0].address != previous.address else []
        return []


def host_ipv4_networks() -> list[ipaddress.IPv4Interface]:
    """This host's non-loopback IPv4 addresses (with their networks) on interfaces that are up."""
    stats = psutil.net_if_stats()
    interfaces: list[ipaddress.IPv4Interface] = []
    for name, addresses in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for address in addresses:
            if address.family != socket.AF_INET or address.netmask is None:
                continue
            interface = ipaddress.IPv4Interface(f"{address.address}/{address.netmask}")
            if not interface.ip.is_loopback:
                interfaces.append(interface)
    return interfaces


DiscoveryLifecycle = Literal["created", "starting", "running", "closing", "closed"]
_TRANSITIONS: dict[DiscoveryLifecycle, frozenset[DiscoveryLifecycle]] = {
    "created": frozenset({"starting", "closed"}),
    "starting": frozenset({"running", "closing", "closed"}),
    "running": frozenset({"closing"}),
    "closing": frozenset({"closed"}),
    "closed": frozenset(),
}


class Discovery:
    """Announces this node over mDNS and reports every other node of the same cluster.

    `on_peer_found(node_id, "HOST:PORT")` runs on the event loop when a peer appears or its address
    changes; `on_peer_lost(node_id)` when it says goodbye or stops matching. Both must not block.
    """

    def __init__(
        self,
        node_id: str,
        bus_port: int,
        on_peer_found: Callable[[str, str], None],
        on_peer_lost: Callable[[str], None] | None = None,
        *,
        addresses: Sequence[str] | None = None,
        cluster_tag: str | None = None,
    ) -> None:
        problem = node_id_problem(node_id)
        if problem is not None:
            raise ValueError(f"cannot announce node id {node_id!r}: {problem}")
        if not 0 < bus_port < 65536:
            raise ValueError(f"bus port {bus_port} is not in 1..65535")
        if cluster_tag is not None and not _CLUSTER_TAG.fullmatch(cluster_tag):
            raise ValueError("cluster tag must be 1 to 64 characters of [0-9A-Za-z_-]")
        if addresses is not None:
            bad = [address for address in addresses if not _usable_ipv4(address)]
            if bad or not addresses:
                raise ValueError(f"addresses must be non-empty unicast IPv4 addresses, got {list(addresses)}")
        self.node_id = node_id
        self.bus_port = bus_port
        self.cluster_tag = cluster_tag
        self.on_peer_found = on_peer_found
        self.on_peer_lost = on_peer_lost
        self.state: DiscoveryLifecycle = "created"
        self.dropped = 0  # malformed announcements from other hosts
        self.rejections: Counter[str] = Counter()  # every ignored announcement but our own, by reason
        self._requested_addresses = list(addresses) if addresses is not None else None
        self._table = PeerTable()
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._announcing: asyncio.Future[object] | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self.announced_addresses: list[str] = []

    def peers(self) -> dict[str, str]:
        """node id -> HOST:PORT of every peer currently known."""
        return self._table.peers()

    def _move(self, target: DiscoveryLifecycle) -> None:
        if target not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"discovery cannot go from {self.state} to {target}")
        self.state = target

    async def start(self) -> None:
        """Open the mDNS sockets, browse, and announce (probing for a clash takes about a second)."""
        self._move("starting")
        host_interfaces = host_ipv4_networks()
        self._table.local_networks = tuple(interface.network for interface in host_interfaces)
        if self._requested_addresses is not None:
            self.announced_addresses = self._requested_addresses
        else:
            self.announced_addresses = sorted({str(interface.ip) for interface in host_interfaces})
        if not self.announced_addresses:
            self._move("closed")
            raise DiscoveryError("no non-loopback IPv4 address to announce; pass addresses or use --peers")
        try:
            self._zeroconf = AsyncZeroconf(interfaces=self.announced_addresses, ip_version=IPVersion.V4Only)
        except OSError as error:
            self._move("closed")  # nothing was opened, so there is nothing to close
            message = f"cannot open mDNS sockets on {self.announced_addresses}: {error}"
            raise DiscoveryError(message) from error
        self._browser = AsyncServiceBrowser(self._zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        registered = False
        try:
            announcing = await self._zeroconf.async_register_service(self._service_info())
            registered = True
        except NonUniqueNameException as error:
            raise DiscoveryError(f"another node already announces node id {self.node_id!r}") from error
        finally:
            if not registered:  # a clash, a cancelled start, a socket error: release what start opened
                await self.close()
        self._announcing = asyncio.ensure_future(announcing)
        self._move("running")

    def _service_info(self) -> AsyncServiceInfo:
        label = instance_label(self.node_id)
        properties: dict[bytes, bytes] = {
            TXT_NODE_ID: self.node_id.encode(),
            TXT_PROTOCOL: str(PROTOCOL_VERSION).encode(),
        }
        if self.cluster_tag is not None:
            properties[TXT_CLUSTER] = self.cluster_tag.encode()
        host_label = "exo-" + hashlib.sha256(self.node_id.encode()).hexdigest()[:16]
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=self.bus_port,
            properties=properties,
            server=f"{host_label}.local.",
            addresses=[socket.inet_aton(address) for address in self.announced_addresses],
            host_ttl=ANNOUNCEMENT_TTL_SECONDS,
            other_ttl=ANNOUNCEMENT_TTL_SECONDS,
        )

    async def close(self) -> None:
        """Say goodbye (peers drop us at once instead of waiting for the TTL) and release the sockets."""
        if self.state in ("closing", "closed"):
            return
        if self.state == "created":
            self._move("closed")
            return
        self._move("closing")
        if self._browser is not None:
            await self._browser.async_cancel()
        pending = [*self._resolving.values(), *([self._announcing] if self._announcing else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._resolving.clear()
        if self._zeroconf is not None:
            await self._zeroconf.async_close()
        self._move("closed")

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if self.state not in ("starting", "running"):
            return
        if state_change is ServiceStateChange.Removed:
            previous = self._resolving.pop(name, None)
            if previous is not None:
                previous.cancel()
            self._apply(self._table.remove(name))
            return
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()  # the newer announcement supersedes the one being resolved
        elif len(self._resolving) >= MAX_PENDING_RESOLVES:
            self.dropped += 1
            self.rejections["too many services being resolved"] += 1
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, service_type, name))
        self._resolving[name] = task
        task.add_done_callback(self._resolve_done)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        result: DiscoveredPeer | Rejection
        if await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
            result = parse_announcement(
                info.properties,
                info.parsed_addresses(IPVersion.V4Only),
                info.port,
                own_node_id=self.node_id,
                cluster_tag=self.cluster_tag,
            )
        elif info.port is not None or info.properties or info.addresses:
            result = Rejection("incomplete announcement (no TXT or no address)", malformed=True)
        else:
            return  # nothing answered: it left before we asked; its removal arrives separately
        if isinstance(result, Rejection) and result.reason != "self":
            self.rejections[result.reason] += 1
            if result.malformed:
                self.dropped += 1
            logger.debug("ignoring mDNS service %s: %s", name, result.reason)
        self._apply(self._table.observe(name, result))

    def _resolve_done(self, task: asyncio.Task[None]) -> None:
        for name, pending in list(self._resolving.items()):
            if pending is task:
                del self._resolving[name]
        if not task.cancelled() and task.exception() is not None:
            logger.error("mDNS peer handling failed", exc_info=task.exception())

    def _apply(self, decisions: list[PeerFound | PeerLost]) -> None:
        for decision in decisions:
            # A failing callback must not break zeroconf's dispatch (it runs inside it) or skip the rest.
            try:
                if isinstance(decision, PeerFound):
                    self.on_peer_found(decision.node_id, decision.address)
                elif self.on_peer_lost is not None:
                    self.on_peer_lost(decision.node_id)
            except Exception:
                logger.exception("discovery callback failed for %s", decision)
