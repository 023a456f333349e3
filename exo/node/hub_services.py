"""Hub models in the node: what the API's model routes and the placement of a Hub id need.

Composition code (like exo/node/api_adapter.py): it joins the fetcher (exo/inference/fetcher.py), the
cluster member (to ask other nodes through the log) and the placement rules. Live download
figures from the other nodes arrive as `DownloadProgressed` messages and are kept here as
last values; the log holds only requested/started/finished/failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from pathlib import Path

from exo.api.cluster_port import ClusterUnavailable, ModelNotFound, ModelUnavailable, NoCapacity
from exo.api.model_routes import NodeModelState
from exo.core import messages as m
from exo.core.events import (
    ModelDownloadFailed,
    ModelDownloadFinished,
    ModelDownloadRequested,
    ModelRemovalRequested,
)
from exo.core.models import ModelFootprint, ModelInfo
from exo.core.state import State
from exo.inference.fetcher import ModelFetcher
from exo.inference.hub import HubError, HubNotFound, import_hub_client
from exo.inference.manifest import is_complete, read_manifest
from exo.inference.models import describe_model, model_folder, split_hub_id
from exo.node.cluster import ClusterMember
from exo.node.peer_sharing import PeerFiles
from exo.roles.downloads import (
    FetchModel,
    RemoveModel,
    default_download_nodes,
    instances_using,
    plan_model_actions,
)

PROGRESS_INTERVAL_SECONDS = 0.25
REMOVE_WAIT_SECONDS = 30.0
MODEL_ACTION_POLL_SECONDS = 1.0


def fetch_hint(model_id: str) -> str:
    return (
        f"{model_id} is a Hugging Face model that no node holds yet; fetch it first with "
        f'`exo models pull {model_id}` or `POST /models/download {{"model_id": "{model_id}"}}`, '
        "or run the node with --auto-download"
    )


def hub_failure(model_id: str, error: HubError) -> Exception:
    if isinstance(error, HubNotFound):
        return ModelNotFound(model_id, error.message)
    return ModelUnavailable(error.message, error.status)


class HubModels:
    """The node's Hub model services: `ModelServices` for the API, and the placement helpers."""

    def __init__(
        self,
        member: ClusterMember,
        fetcher: ModelFetcher,
        *,
        local_models: Callable[[], list[ModelInfo]],
        auto_download: bool = False,
        footprint_of_model: Callable[[ModelInfo], ModelFootprint] = ModelFootprint.of_model,
    ) -> None:
        self.member = member
        self.fetcher = fetcher
        self._local_models = local_models
        # This node's footprint of a model (at its `--weights-dtype`): what place_instance asks
        # placement for, so a download's default nodes are the ones the instance will use.
        self.footprint_of_model = footprint_of_model
        self.auto_download = auto_download
        self._running: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # One download per cluster: files come from peers before the Hub.
        self.peers = PeerFiles(member, fetcher)

    @property
    def node_id(self) -> str:
        return self.member.node_id

    @staticmethod
    def is_hub_id(model_id: str) -> bool:
        return split_hub_id(model_id) is not None

    # --- placement of a Hub id -------------------------------------------------------------------

    def in_cluster(self, model_id: str) -> bool:
        """Whether some node holds (some of) the model's files, so placing it fetches only what
        the chosen nodes lack, from those peers or the Hub."""
        repo_id = model_id.split("@", 1)[0]
        if (model_folder(self.fetcher.models_dir, model_id) / "config.json").is_file():
            return True
        state = self.member.state
        return any(
            (download := models.get(repo_id)) is not None and download.status == "ready"
            for models in state.downloads.values()
        )

    async def describe(self, model_id: str, *, allow_download: bool) -> ModelInfo:
        """The model's description for placement: from the Hub's metadata (or the local manifest).
        Raises ModelNotFound (with how to fetch it) when it is nowhere and fetching is not allowed."""
        if not allow_download and not self.in_cluster(model_id):
            raise ModelNotFound(model_id, fetch_hint(model_id))
        folder = model_folder(self.fetcher.models_dir, model_id)
        with contextlib.suppress(ValueError):
            if (folder / "config.json").is_file() and read_manifest(folder) is None:
                from exo.inference.models import get_model

                return get_model(self.fetcher.models_dir, model_id)  # put there by hand
        try:
            return await self.fetcher.describe(model_id)
        except HubError as error:
            raise hub_failure(model_id, error) from None

    def known_footprint(self, model_id: str) -> ModelFootprint | None:
        """The footprint of a Hub model this node knows the description of (its manifest, or a
        recent read of the Hub's metadata), without the network: what re-placing an instance of
        it needs on a master that does not hold it."""
        if not self.is_hub_id(model_id):
            return None
        model = self.fetcher.known(model_id)
        if model is None:
            return None
        folder = str(model_folder(self.fetcher.models_dir, model_id))
        info = describe_model(model_id, folder, model.config, model.tensors)
        return self.footprint_of_model(info) if info.supported else None

    async def ensure_support_files(self, model_id: str, *, allow_download: bool) -> Path:
        """Config and tokenizer files here (for the chat template), fetched when allowed."""
        folder = model_folder(self.fetcher.models_dir, model_id)
        if (folder / "config.json").is_file():
            return folder
        if not allow_download and not self.in_cluster(model_id):
            raise ModelNotFound(model_id, fetch_hint(model_id))
        try:
            return await self.fetcher.ensure(model_id, support_only=True)
        except HubError as error:
            raise hub_failure(model_id, error) from None

    async def prepare_stage(
        self, model_id: str, start: int, end: int, on_download: Callable[[], None]
    ) -> None:
        """The worker's hook: fetch what a stage lacks (LookupError with the reason on failure)."""
        if not self.is_hub_id(model_id):
            return
        folder = model_folder(self.fetcher.models_dir, model_id)
        try:
            if (folder / "config.json").is_file() and read_manifest(folder) is None:
                return  # a model folder put there by hand: used as it is
        except ValueError:
            pass
        try:
            await self.fetcher.ensure(model_id, (start, end), on_download)
        except HubError as error:
            raise LookupError(error.message) from None

    # --- ModelServices -----------------------------------------------------------------------------

    def model_states(self) -> dict[str, dict[str, NodeModelState]]:
        state = self.member.state
        result: dict[str, dict[str, NodeModelState]] = {}
        for node_id, models in state.downloads.items():
            for model_id, download in models.items():
                if download.status == "removed":
                    continue
                result.setdefault(model_id, {})[node_id] = NodeModelState(
                    download.status,
                    download.bytes_total if download.status == "ready" else 0,
                    download.bytes_total,
                    download.reason,
                )
        for model in self._local_models():
            result.setdefault(model.model_id, {}).setdefault(
                self.node_id, NodeModelState("ready", model.total_weight_bytes, model.total_weight_bytes)
            )
        for node_id, heartbeat in self.member.heartbeats.items():
            for model_id in heartbeat.models:
                result.setdefault(model_id, {}).setdefault(node_id, NodeModelState("ready"))
        live = [(self.node_id, progress.model_id, progress) for progress in self.fetcher.progress().values()]
        for (node_id, model_id), message in self.remote.items():
            live.append((node_id, model_id, message))  # type: ignore[arg-type]
        for node_id, model_id, figures in live:
            current = result.get(model_id, {}).get(node_id)
            if figures.status == "downloading" and (
                current is None or current.status in ("requested", "downloading")
            ):
                result.setdefault(model_id, {})[node_id] = NodeModelState(
                    "downloading", figures.bytes_done, figures.bytes_total
                )
        return result

    async def download_model(self, model_id: str, node_ids: list[str] | None) -> list[str]:
        if not self.is_hub_id(model_id):
            raise ModelUnavailable(
                f"{model_id!r} is not a Hugging Face repo id (org/name[@revision]): nothing to fetch", 400
            )
        model = await self.describe(model_id, allow_download=True)
        state = self.member.state
        alive = {node.node_id: node for node in state.nodes.values() if node.status == "alive"}
        if node_ids is None:
            chosen = default_download_nodes(
                state, model_id, self.footprint_of_model(model), self._nodes_with_model(model_id)
            )
            if isinstance(chosen, m.Refused):
                raise NoCapacity(model_id, [chosen.detail or "placement refused"])
            node_ids = chosen
        unknown = [node_id for node_id in node_ids if node_id not in alive]
        if unknown:
            raise ModelUnavailable(f"no alive node {', '.join(map(repr, unknown))} in the cluster", 404)
        repo_id = model_id.split("@", 1)[0]
        if repo_id != model_id:
            raise ModelUnavailable("download a revision by placing it; /models/download takes org/name", 400)
        self.member.submit([ModelDownloadRequested(node_id, repo_id) for node_id in node_ids])
        return list(node_ids)

    def _nodes_with_model(self, model_id: str) -> dict[str, set[str]]:
        """Nodes that hold the whole model (as their heartbeats say, and this one), as the master
        sees them when it places an instance."""
        holding = {node_id for node_id, beat in self.member.heartbeats.items() if model_id in beat.models}
        if any(model.model_id == model_id for model in self._local_models()) and self._holds_whole(model_id):
            holding.add(self.node_id)
        return {model_id: holding}

    def _holds_whole(self, model_id: str) -> bool:
        return is_complete(model_folder(self.fetcher.models_dir, model_id))

    async def delete_model(self, model_id: str) -> list[str]:
        state = self.member.state
        using = instances_using(state, model_id)
        if using:
            raise ModelUnavailable(
                f"{model_id} is in use by instance(s) {', '.join(using)}: delete them first", 409
            )
        repo_id = model_id.split("@", 1)[0]
        targets = sorted(node.node_id for node in state.nodes.values() if node.status == "alive")
        if not targets:
            targets = [self.node_id]
        request_id = secrets.token_hex(6)
        self.member.submit([ModelRemovalRequested(node_id, repo_id, request_id) for node_id in targets])

        def removed(current: State) -> bool:
            return all(
                (download := current.downloads.get(node_id, {}).get(repo_id)) is not None
                and download.status == "removed"
                and download.request_id == request_id
                for node_id in targets
            )

        if not await self.member.replica.wait_for(removed, REMOVE_WAIT_SECONDS):
            raise ClusterUnavailable(f"not every node removed {model_id} within {REMOVE_WAIT_SECONDS:g} s")
        return targets

    # --- the node's loops ----------------------------------------------------------------------------

    def on_progress(self, message: m.DownloadProgressed) -> None:
        self.peers.on_progress(message)

    @property
    def remote(self) -> dict[tuple[str, str], m.DownloadProgressed]:
        return self.peers.remote

    async def serve_file_chunk(self, request: m.FileChunkRequested) -> m.Reply:
        return await self.peers.serve_file_chunk(request)

    async def serve_hub_model(self, request: m.HubModelRequested) -> m.Reply:
        return await self.peers.serve_hub_model(request)

    @property
    def peer_bytes_served(self) -> int:
        return self.peers.bytes_served

    @property
    def peer_bytes_fetched(self) -> int:
        return self.peers.bytes_fetched

    async def publish_progress(self) -> None:
        """Send this node's live figures a few times a second, only when they moved."""
        seen = -1
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_SECONDS)
            if self.fetcher.version == seen:
                continue
            seen = self.fetcher.version
            for progress in self.fetcher.progress().values():
                files = {path: (each.bytes_done, each.bytes_total) for path, each in progress.files.items()}
                message = m.DownloadProgressed(
                    self.node_id, progress.model_id, progress.status, progress.bytes_done,
                    progress.bytes_total, files, progress.reason,
                )  # fmt: skip
                self.member.bus.publish(m.TOPIC_DOWNLOADS, message)

    async def act_on_requests(self) -> None:
        """Carry out the downloads and removals the log asks of this node (and resume a whole-model
        download a restart cut short)."""
        await asyncio.to_thread(import_hub_client)
        seen = -1

        def moved(state: State) -> bool:
            return state.last_event_index != seen

        while True:
            await self.member.replica.wait_for(moved, MODEL_ACTION_POLL_SECONDS)
            state = self.member.state
            seen = state.last_event_index
            running = self._running | self.fetcher.in_flight
            for action in plan_model_actions(state, self.node_id, running):
                self._running.add(action.model_id)
                task = asyncio.create_task(self._act(action), name=f"model-{action.model_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _act(self, action: FetchModel | RemoveModel) -> None:
        try:
            match action:
                case FetchModel(model_id=model_id):
                    try:
                        await self.fetcher.ensure(model_id)
                    except HubError as error:
                        if not self._reported_failure(model_id):
                            self.member.submit([ModelDownloadFailed(self.node_id, model_id, error.message)])
                        return
                    except (OSError, ValueError):
                        return  # the fetcher reported it
                    download = self.member.state.downloads.get(self.node_id, {}).get(model_id)
                    if download is None or download.status != "ready":
                        model = await self.fetcher.hub_model(model_id)
                        self.member.submit([ModelDownloadFinished(self.node_id, model_id, model.total_bytes)])
                case RemoveModel(model_id=model_id, request_id=request_id):
                    await self.fetcher.remove(model_id, request_id)
        finally:
            self._running.discard(action.model_id)

    def _reported_failure(self, model_id: str) -> bool:
        progress = self.fetcher.progress().get(model_id)
        return progress is not None and progress.status == "failed"

    async def close(self) -> None:
        self.peers.closing.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
