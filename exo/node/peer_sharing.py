"""Model files between the cluster's nodes: one download per cluster.

A node serves the files it holds (verified) to its peers over the bus's request channel, and
describes the Hub models it knows. A node fetching a file asks the peers that hold it first; when
none does and another node's download, started earlier in the log, lacks it too, it waits for
that node to fetch it from the Hub and copies it from there (exo.roles.downloads.hub_fetcher),
falling back to the Hub itself when that node dies, fails or stalls.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import msgspec

from exo.bus.transport import RequestTimedOut
from exo.core import messages as m
from exo.inference.fetcher import ModelFetcher
from exo.inference.manifest import HubFile, HubModel
from exo.inference.peer_files import FileRange, NotServed, ProgressCallback, fetch_from_peers, read_chunk
from exo.node.cluster import ClusterMember
from exo.roles.downloads import hub_fetcher

PEER_CHUNK_SECONDS = 10.0
PEER_MODEL_SECONDS = 1.0
# A node waiting for the node that fetches a shared file from the Hub polls it this often, and
# fetches the file itself when that node's figures have not moved for PEER_STALL_SECONDS.
PEER_WAIT_POLL_SECONDS = 0.1
PEER_STALL_SECONDS = 20.0
OWN_START_WAIT_SECONDS = 5.0
# Every download thread waits for its own ModelDownloadStarted to be applied before its first
# file (tens of ms after the start): polled finely, as each poll's lag delays the whole download.
OWN_START_POLL_SECONDS = 0.01
# A download installs config.json last (a folder is a model once it is there), so a peer could
# copy it only after that whole download: a node writes it from the model's description (read
# from the placing node, exo.inference.downloads), or, for a description without it, fetches it
# from the Hub itself.
HELD_BACK = "config.json"


class PeerFiles:
    """This node's side of file sharing: serving, asking, and the live figures of the others'
    downloads (to tell a peer that stalled from one that works)."""

    def __init__(self, member: ClusterMember, fetcher: ModelFetcher) -> None:
        self.member = member
        self.fetcher = fetcher
        self.remote: dict[tuple[str, str], m.DownloadProgressed] = {}
        # When each peer's download figures last moved (a peer we wait for that stops moving
        # is given up on: the file comes from the Hub).
        self._moved_at: dict[tuple[str, str], float] = {}
        self.peer_stall_seconds = PEER_STALL_SECONDS
        self._loop = asyncio.get_running_loop()
        self.bytes_served = 0
        self.bytes_fetched = 0
        # Set when the node stops: a download thread waiting for a peer stops waiting (the loop
        # it would ask through is going away).
        self.closing = threading.Event()
        fetcher.source = self.peer_source
        fetcher.ask_peers = self.hub_model_from_peers

    def on_progress(self, message: m.DownloadProgressed) -> None:
        if message.node_id != self.member.node_id:
            key = (message.node_id, message.model_id)
            previous = self.remote.get(key)
            if previous is None or previous.bytes_done != message.bytes_done:
                self._moved_at[key] = time.monotonic()
            self.remote[key] = message

    async def serve_file_chunk(self, request: m.FileChunkRequested) -> m.Reply:
        try:
            wanted = FileRange(request.repo_id, request.commit, request.path, request.offset, request.length)
            data, size = await asyncio.to_thread(read_chunk, self.fetcher.models_dir, wanted)
        except (NotServed, OSError, ValueError) as error:
            return m.RequestFailed(str(error))
        self.bytes_served += len(data)
        return m.FileChunkAnswered(request.offset, size, data)

    async def serve_hub_model(self, request: m.HubModelRequested) -> m.Reply:
        known = self.fetcher.known(request.model_id)
        if known is None:
            return m.RequestFailed(f"{request.model_id} is not known here")
        return m.HubModelAnswered(msgspec.json.encode(known))

    async def hub_model_from_peers(self, model_id: str) -> HubModel | None:
        """A Hub model's description from any alive peer that has it (all asked at once): the
        node that placed it read the Hub's metadata, the stages need not read it again."""
        state = self.member.state
        peers = [
            node_id
            for node_id, node in state.nodes.items()
            if node.status == "alive" and node_id != self.member.node_id
        ]
        if not peers:
            return None

        async def ask(peer: str) -> HubModel | None:
            try:
                reply = await self.member.bus.request(
                    peer, m.HubModelRequested(model_id), timeout=PEER_MODEL_SECONDS
                )
            except RequestTimedOut:
                return None
            if not isinstance(reply, m.HubModelAnswered):
                return None
            try:
                return msgspec.json.decode(reply.model, type=HubModel)
            except msgspec.DecodeError:
                return None

        for answer in asyncio.as_completed([ask(peer) for peer in peers]):
            model = await answer
            if model is not None:
                return model
        return None

    def peers_holding(self, repo_id: str) -> list[str]:
        """Alive peers the log says hold files of the model, those with all of it first."""
        state = self.member.state
        found: list[tuple[bool, str]] = []
        for node_id, models in state.downloads.items():
            download = models.get(repo_id)
            node = state.nodes.get(node_id)
            if node_id == self.member.node_id or download is None or download.status != "ready":
                continue
            if node is not None and node.status == "alive":
                found.append((not download.whole, node_id))
        return [node_id for _partial, node_id in sorted(found)]

    def peer_source(
        self, model: HubModel, hub_file: HubFile, destination: Path, progress: ProgressCallback
    ) -> bool:
        """The fetcher's FileSource (runs in its download thread): the file from peers that hold
        it; else, when another node's download started first and lacks it too, from that node
        once it has fetched it from the Hub (one Hub download per file for the cluster). False:
        this node fetches it from the Hub (it is first, or the one it waited for died or stalled)."""
        repo_id, path = model.repo_id, hub_file.path

        def fetch(peers: list[str]) -> bool:
            return bool(peers) and fetch_from_peers(
                peers, self._ask_chunk, model, hub_file, destination=destination, progress=progress
            )

        if fetch(self.peers_holding(repo_id)):
            return True
        if path == HELD_BACK:
            return False  # installed last by the node fetching it: waiting would cost its whole download
        self._wait_for_own_start(repo_id, path)
        waiting_since = time.monotonic()
        while True:
            first = hub_fetcher(self.member.state, repo_id, path)
            ahead = [first] if first is not None and first != self.member.node_id else []
            if fetch(ahead + [peer for peer in self.peers_holding(repo_id) if peer not in ahead]):
                return True
            if not ahead or self._stalled(ahead[0], repo_id, waiting_since) or self.closing.is_set():
                return False
            self.closing.wait(PEER_WAIT_POLL_SECONDS)

    def _wait_for_own_start(self, repo_id: str, path: str) -> None:
        """Until this node's ModelDownloadStarted listing the file is applied (a bounded wait):
        then every download that started before it is known, and who fetches the file is settled."""
        deadline = time.monotonic() + OWN_START_WAIT_SECONDS
        while time.monotonic() < deadline and not self.closing.is_set():
            download = self.member.state.downloads.get(self.member.node_id, {}).get(repo_id)
            if download is not None and download.status == "downloading" and path in download.files:
                return
            self.closing.wait(OWN_START_POLL_SECONDS)

    def _stalled(self, peer: str, repo_id: str, waiting_since: float) -> bool:
        """The node fetching for us sent no progress that moved for PEER_STALL_SECONDS."""
        moved = self._moved_at.get((peer, repo_id), 0.0)
        return time.monotonic() - max(moved, waiting_since) > self.peer_stall_seconds

    def _ask_chunk(self, peer: str, wanted: FileRange) -> tuple[bytes, int] | None:
        offset = wanted.offset
        request = m.FileChunkRequested(wanted.repo_id, wanted.commit, wanted.path, offset, wanted.length)
        future = asyncio.run_coroutine_threadsafe(
            self.member.bus.request(peer, request, timeout=PEER_CHUNK_SECONDS), self._loop
        )
        try:
            reply = future.result(timeout=PEER_CHUNK_SECONDS + 5)
        except (RequestTimedOut, TimeoutError, RuntimeError):
            future.cancel()
            return None
        if not isinstance(reply, m.FileChunkAnswered) or reply.offset != offset:
            return None
        self.bytes_fetched += len(reply.data)
        return reply.data, reply.size
