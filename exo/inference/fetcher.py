"""The node's model fetcher: the async shell over exo.inference.hub and exo.inference.downloads.

One download per model at a time on a node (a second asker waits for the first); the blocking
work runs in a thread, never on the event loop. It keeps the live figures (bytes done and total
per file) that `/node_status`, `/models` and the progress messages show, and reports to the log
only that a download started, finished or failed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import msgspec

from exo.core.events import (
    Event,
    ModelDownloadFailed,
    ModelDownloadFinished,
    ModelDownloadStarted,
    ModelRemoved,
)
from exo.core.models import ModelInfo
from exo.inference.downloads import (
    FileSource,
    FreeBytes,
    download_files,
    free_disk_bytes,
    missing_files,
    remove_model,
    staging_folder,
)
from exo.inference.hub import HubError, HubSettings, fetch_hub_model
from exo.inference.manifest import HubFile, HubModel, is_weight_file, needed_files, read_manifest
from exo.inference.models import describe_model, model_folder, split_hub_id

MODEL_CACHE_SECONDS = 300.0


class FileProgress(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    bytes_done: int
    bytes_total: int


class DownloadProgress(msgspec.Struct, forbid_unknown_fields=True):
    """A node's live figures for one model: never written to the log."""

    model_id: str
    status: str  # "downloading", "ready", "failed"
    bytes_done: int = 0
    bytes_total: int = 0
    files: dict[str, FileProgress] = {}
    reason: str | None = None
    updated_at: float = 0.0


class ModelFetcher:
    def __init__(
        self,
        node_id: str,
        models_dir: Path,
        report: Callable[[Sequence[Event]], None],
        *,
        settings: Callable[[], HubSettings] = HubSettings.from_environment,
        free_bytes: FreeBytes = free_disk_bytes,
        source: FileSource | None = None,
    ) -> None:
        self.node_id = node_id
        # Asks peers for a Hub model's description before the Hub (set by the node).
        self.ask_peers: Callable[[str], Awaitable[HubModel | None]] | None = None
        self.models_dir = Path(models_dir)
        self._report = report
        self._settings = settings
        self._free_bytes = free_bytes
        self.source = source
        self._locks: dict[str, asyncio.Lock] = {}
        self._models: dict[str, tuple[float, HubModel]] = {}
        self._progress: dict[str, DownloadProgress] = {}
        self._progress_lock = threading.Lock()
        self.version = 0  # bumped on every progress change (the publisher sends only news)
        self.in_flight: set[str] = set()  # repo ids being fetched or waiting to be

    # --- metadata ------------------------------------------------------------------------------

    async def hub_model(self, model_id: str) -> HubModel:
        """The Hub's description of a model: from its folder's manifest when it matches (no
        network), a recent fetch, a peer that knows it, else the Hub (cached for a few minutes).
        Raises HubError, ValueError."""
        hub = split_hub_id(model_id)
        if hub is None:
            raise ValueError(f"{model_id!r} is not a Hugging Face repo id (org/name)")
        repo_id, revision = hub
        cached = self.known(model_id)
        if cached is not None:
            return cached
        if self.ask_peers is not None:
            from_peer = await self.ask_peers(model_id)
            if from_peer is not None and from_peer.repo_id == repo_id:
                self._models[model_id] = (time.monotonic(), from_peer)
                return from_peer
        scratch = staging_folder(self.models_dir, repo_id) / ".meta"
        model = await asyncio.to_thread(fetch_hub_model, repo_id, revision, self._settings(), scratch)
        self._models[model_id] = (time.monotonic(), model)
        return model

    def known(self, model_id: str) -> HubModel | None:
        """The description this node already has (its manifest or a recent fetch), if any."""
        hub = split_hub_id(model_id)
        if hub is None:
            return None
        try:
            manifest = read_manifest(model_folder(self.models_dir, model_id))
        except ValueError:
            manifest = None
        if manifest is not None and hub[1] in (None, manifest.model.revision, manifest.model.commit):
            return manifest.model
        cached = self._models.get(model_id)
        if cached is not None and time.monotonic() - cached[0] < MODEL_CACHE_SECONDS:
            return cached[1]
        return None

    async def describe(self, model_id: str) -> ModelInfo:
        """A Hub model's description (for placement) from metadata only: nothing is fetched."""
        model = await self.hub_model(model_id)
        return describe_model(
            model_id, str(model_folder(self.models_dir, model_id)), model.config, model.tensors
        )

    # --- downloads -----------------------------------------------------------------------------

    async def ensure(
        self,
        model_id: str,
        layers: tuple[int, int] | None = None,
        on_download: Callable[[], None] | None = None,
        *,
        support_only: bool = False,
    ) -> Path:
        """Make this node hold what it needs of a Hub model: the whole model (`layers` None), a
        stage's files, or only config and tokenizer (`support_only`). Returns the folder."""
        repo_id = model_id.split("@", 1)[0]
        lock = self._locks.setdefault(repo_id, asyncio.Lock())
        async with lock:
            self.in_flight.add(repo_id)
            try:
                return await self._ensure(model_id, repo_id, layers, on_download, support_only=support_only)
            finally:
                self.in_flight.discard(repo_id)

    async def _ensure(
        self,
        model_id: str,
        repo_id: str,
        layers: tuple[int, int] | None,
        on_download: Callable[[], None] | None,
        *,
        support_only: bool,
    ) -> Path:
        model = await self.hub_model(model_id)
        files = needed_files(model, layers)
        if support_only:
            files = [hub_file for hub_file in files if not is_weight_file(hub_file.path)]
        # In a thread: a file a kill left unlisted is checked against its sha256 (downloads.py).
        missing = await asyncio.to_thread(missing_files, self.models_dir, model, files)
        if not missing:
            return model_folder(self.models_dir, model_id)
        if on_download is not None:
            on_download()
        total = sum(hub_file.size for hub_file in files)
        self._start_progress(repo_id, files)
        whole = layers is None and not support_only
        fetching = [hub_file.path for hub_file in missing]
        self._report([ModelDownloadStarted(self.node_id, repo_id, total, whole=whole, files=fetching)])
        try:
            folder = await asyncio.to_thread(
                download_files,
                self.models_dir,
                model,
                files,
                self._settings(),
                progress=lambda path, done, size: self._on_progress(repo_id, path, done, size),
                free_bytes=self._free_bytes,
                source=self.source,
            )
        except (HubError, OSError, ValueError) as error:
            reason = error.message if isinstance(error, HubError) else f"{type(error).__name__}: {error}"
            self._finish_progress(repo_id, "failed", reason)
            self._report([ModelDownloadFailed(self.node_id, repo_id, reason)])
            raise
        self._finish_progress(repo_id, "ready", None)
        self._report([ModelDownloadFinished(self.node_id, repo_id, total, whole=whole)])
        return folder

    async def remove(self, model_id: str, request_id: str = "") -> bool:
        repo_id = model_id.split("@", 1)[0]
        lock = self._locks.setdefault(repo_id, asyncio.Lock())
        async with lock:
            removed = await asyncio.to_thread(remove_model, self.models_dir, repo_id)
            with self._progress_lock:
                self._progress.pop(repo_id, None)
                self.version += 1
            self._models = {key: value for key, value in self._models.items() if not key.startswith(repo_id)}
        self._report([ModelRemoved(self.node_id, repo_id, had_files=removed, request_id=request_id)])
        return removed

    # --- live figures --------------------------------------------------------------------------

    def progress(self) -> dict[str, DownloadProgress]:
        with self._progress_lock:
            return {
                key: msgspec.structs.replace(value, files=dict(value.files))
                for key, value in self._progress.items()
            }

    def _start_progress(self, repo_id: str, files: list[HubFile]) -> None:
        entries = {hub_file.path: FileProgress(0, hub_file.size) for hub_file in files}
        with self._progress_lock:
            self._progress[repo_id] = DownloadProgress(
                repo_id, "downloading", 0, sum(entry.bytes_total for entry in entries.values()), entries,
                updated_at=time.time(),
            )  # fmt: skip
            self.version += 1

    def _on_progress(self, repo_id: str, path: str, done: int, size: int) -> None:
        """Called from the download thread (often): figures only, under a lock."""
        with self._progress_lock:
            progress = self._progress.get(repo_id)
            if progress is None:
                return
            previous = progress.files.get(path)
            progress.files[path] = FileProgress(done, size)
            progress.bytes_done += done - (previous.bytes_done if previous is not None else 0)
            progress.updated_at = time.time()
            self.version += 1

    def _finish_progress(self, repo_id: str, status: str, reason: str | None) -> None:
        with self._progress_lock:
            progress = self._progress.get(repo_id)
            if progress is not None:
                progress.status = status
                progress.reason = reason
                if status == "ready":
                    progress.bytes_done = progress.bytes_total
                progress.updated_at = time.time()
            self.version += 1
