"""A node waiting for the node that fetches a shared file from the Hub: it copies the file once
that node has it, and gives up (the Hub, then) when that node stalls or goes away."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from exo.core import messages as m
from exo.core.events import Event, IndexedEvent, ModelDownloadStarted, NodeJoined, NodeTimedOut
from exo.core.state import State, apply
from exo.inference.manifest import HubFile, HubModel
from exo.node.peer_sharing import PeerFiles

REPO = "org/model"
DATA = bytes(range(256)) * 40
HUB_FILE = HubFile("model.safetensors", len(DATA), "0" * 64)
MODEL = HubModel(REPO, "main", "c" * 40, [HUB_FILE], [], {}, {})


def fold(state: State, *events: Event) -> State:
    for event in events:
        state = apply(state, IndexedEvent(state.last_event_index + 1, 1, "a", 0, event))
    return state


def two_downloads() -> State:
    """ "b" started first: it fetches the file from the Hub, "a" waits for it."""
    return fold(
        State(),
        NodeJoined("a", "a:1", 1 << 30, 1 << 30),
        NodeJoined("b", "b:1", 1 << 30, 1 << 30),
        ModelDownloadStarted("b", REPO, len(DATA), files=[HUB_FILE.path]),
        ModelDownloadStarted("a", REPO, len(DATA), files=[HUB_FILE.path]),
    )


@dataclass
class FakeBus:
    """Peer "b": does not hold the file until `holds` is set, then serves it."""

    holds: bool = False
    asked: list[tuple[str, int]] = field(default_factory=list[tuple[str, int]])
    any_ask: asyncio.Event = field(default_factory=asyncio.Event)

    async def request(self, peer: str, request: m.FileChunkRequested, timeout: float) -> m.Reply:
        self.asked.append((peer, request.offset))
        self.any_ask.set()
        if not self.holds:
            return m.RequestFailed("not held here")
        chunk = DATA[request.offset : request.offset + request.length]
        return m.FileChunkAnswered(request.offset, len(DATA), chunk)


@dataclass
class FakeMember:
    state: State
    bus: FakeBus
    node_id: str = "a"


class FakeFetcher:
    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.source: object = None
        self.ask_peers: object = None


def progress(_path: str, _done: int, _total: int) -> None:
    return


async def test_the_waiting_node_copies_the_file_once_the_first_node_has_it(tmp_path: Path) -> None:
    member = FakeMember(two_downloads(), FakeBus())
    peers = PeerFiles(member, FakeFetcher(tmp_path))  # type: ignore[arg-type]
    destination = tmp_path / "part"
    waiting = asyncio.create_task(
        asyncio.to_thread(peers.peer_source, MODEL, HUB_FILE, destination, progress)
    )
    while len(member.bus.asked) < 3:  # it asks "b" again and again while "b" downloads
        peers.on_progress(m.DownloadProgressed("b", REPO, "downloading", len(member.bus.asked), len(DATA)))
        await asyncio.sleep(0.05)
    assert not waiting.done()
    member.bus.holds = True
    assert await asyncio.wait_for(waiting, 10) is True
    assert destination.read_bytes() == DATA
    assert {peer for peer, _offset in member.bus.asked} == {"b"}
    assert peers.bytes_fetched == len(DATA)


async def test_the_waiting_node_gives_up_on_a_stalled_or_gone_first_node(tmp_path: Path) -> None:
    member = FakeMember(two_downloads(), FakeBus())
    peers = PeerFiles(member, FakeFetcher(tmp_path))  # type: ignore[arg-type]
    peers.peer_stall_seconds = 0.5  # "b" never reports progress
    stalled = await asyncio.wait_for(
        asyncio.to_thread(peers.peer_source, MODEL, HUB_FILE, tmp_path / "part", progress), 10
    )
    assert stalled is False and member.bus.asked
    # "b" is gone: "a" is first in line for the file now, the Hub at once.
    member.state = fold(member.state, NodeTimedOut("b"))
    member.bus.asked.clear()
    peers.peer_stall_seconds = 3600.0
    gone = await asyncio.wait_for(
        asyncio.to_thread(peers.peer_source, MODEL, HUB_FILE, tmp_path / "part", progress), 10
    )
    assert gone is False and member.bus.asked == []


async def test_the_first_node_fetches_from_the_hub_without_waiting(tmp_path: Path) -> None:
    state = two_downloads()
    member = FakeMember(state, FakeBus(), node_id="b")
    peers = PeerFiles(member, FakeFetcher(tmp_path))  # type: ignore[arg-type]
    peers.peer_stall_seconds = 3600.0
    first = await asyncio.wait_for(
        asyncio.to_thread(peers.peer_source, MODEL, HUB_FILE, tmp_path / "part", progress), 10
    )
    assert first is False and member.bus.asked == []
    assert state.downloads["b"][REPO].since < state.downloads["a"][REPO].since


async def test_a_stopping_node_stops_waiting(tmp_path: Path) -> None:
    member = FakeMember(two_downloads(), FakeBus())
    peers = PeerFiles(member, FakeFetcher(tmp_path))  # type: ignore[arg-type]
    peers.peer_stall_seconds = 3600.0
    waiting = asyncio.create_task(
        asyncio.to_thread(peers.peer_source, MODEL, HUB_FILE, tmp_path / "part", progress)
    )
    await asyncio.wait_for(member.bus.any_ask.wait(), 10)  # it is waiting for "b"
    peers.closing.set()
    assert await asyncio.wait_for(waiting, 10) is False
