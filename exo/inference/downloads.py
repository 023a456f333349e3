"""Fetching a model's files into the models dir: huggingface_hub does the HTTP, this does the rest.

A download goes to a staging folder, `MODELS_DIR/.downloads/org/name/`, each file through
huggingface_hub's `http_get` into a part file named by its sha256, so an interrupted file (a broken
connection, a node killed mid-file) resumes from the bytes it has.
Each weight file is verified against the Hub's LFS sha256 (a bad one is fetched once more, then
refused); only verified files are moved into `MODELS_DIR/org/name/`, config.json last, and the
manifest lists a file only once it is there. So the models dir never holds a half-written file
where a model is expected, and a node killed mid-download resumes from the bytes it had.

Free disk is checked before anything is fetched. A file can come from a peer instead of the Hub
(`FileSource`): it is verified the same way. Everything here blocks; callers use a thread.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, cast

from exo.inference.hub import HubError, HubSettings, configure_huggingface_hub, hub_errors
from exo.inference.manifest import (
    MANIFEST_NAME,
    HubFile,
    HubModel,
    Manifest,
    held_files,
    read_manifest,
    write_manifest,
)
from exo.inference.models import model_folder

STAGING_DIR = ".downloads"
PARALLEL_FILES = 4
HASH_CHUNK = 8 << 20

# (file path in the repo, bytes done, bytes in all) for one file; called from the download thread.
ProgressCallback = Callable[[str, int, int], None]
FreeBytes = Callable[[Path], int]


class DiskFull(HubError):
    status = 507


class CorruptDownload(HubError):
    status = 502


class DownloadCancelled(HubError):
    status = 409


class FileSource(Protocol):
    """Somewhere else a file can come from (a peer holding it): write it to `destination` and
    return True, or return False (nobody has it, or the transfer broke; partial bytes may stay
    in `destination` for the next source to resume)."""

    def __call__(
        self, model: HubModel, hub_file: HubFile, destination: Path, progress: ProgressCallback
    ) -> bool: ...


def free_disk_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def format_size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def staging_folder(models_dir: Path, repo_id: str) -> Path:
    return Path(models_dir) / STAGING_DIR / repo_id


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verified(path: Path, hub_file: HubFile) -> bool:
    """The file is complete and, for an LFS file, has the Hub's sha256."""
    if not path.is_file() or path.stat().st_size != hub_file.size:
        return False
    return hub_file.sha256 is None or sha256_of(path) == hub_file.sha256


def missing_files(models_dir: Path, model: HubModel, files: list[HubFile]) -> list[HubFile]:
    """Of `files`, those the model folder does not hold verified (at this commit's content)."""
    target = model_folder(models_dir, model.repo_id)
    try:
        manifest = read_manifest(target)
    except ValueError:
        manifest = None
    held: set[str] = set()
    if manifest is not None:
        for path in held_files(target, manifest):
            try:
                if manifest.model.file(path) == model.file(path):
                    held.add(path)
            except KeyError:
                continue
    held |= _installed_unlisted(target, files, held)
    return [hub_file for hub_file in files if hub_file.path not in held]


def _installed_unlisted(target: Path, files: list[HubFile], held: set[str]) -> set[str]:
    """Files a kill left in place between their move and the manifest's write: a file is moved
    there only once verified, so one that still has the Hub's sha256 is kept, not fetched again."""
    return {
        hub_file.path
        for hub_file in files
        if hub_file.path not in held
        and hub_file.path != "config.json"  # installed last: it marks a whole model
        and verified(target / hub_file.path, hub_file)
    }


def download_files(
    models_dir: Path,
    model: HubModel,
    files: list[HubFile],
    settings: HubSettings,
    *,
    progress: ProgressCallback | None = None,
    free_bytes: FreeBytes = free_disk_bytes,
    source: FileSource | None = None,
    cancelled: threading.Event | None = None,
) -> Path:
    """Make the model folder hold `files` (verified), fetching what it lacks; returns the folder."""
    models_dir = Path(models_dir)
    target = model_folder(models_dir, model.repo_id)
    staging = staging_folder(models_dir, model.repo_id)
    report = progress or (lambda _path, _done, _total: None)
    missing = missing_files(models_dir, model, files)
    for hub_file in files:
        if hub_file not in missing:
            report(hub_file.path, hub_file.size, hub_file.size)
    if not missing:
        return target
    staging.mkdir(parents=True, exist_ok=True)
    needed = sum(hub_file.size - _staged_bytes(staging, hub_file) for hub_file in missing)
    free = free_bytes(models_dir)
    if needed > free:
        raise DiskFull(
            f"not enough disk for {model.repo_id}: needs {format_size(needed)} ({needed} bytes) in "
            f"{models_dir}, {format_size(free)} ({free} bytes) free"
        )

    installer = _Installer(target, staging, model)
    installer.held.update(hub_file.path for hub_file in files if hub_file not in missing)

    def fetch(hub_file: HubFile) -> None:
        if cancelled is not None and cancelled.is_set():
            raise DownloadCancelled(f"download of {model.repo_id} was cancelled")
        _fetch_verified(staging, model, hub_file=hub_file, settings=settings, report=report, source=source)
        if hub_file.path != "config.json":
            installer.install(hub_file)  # peers waiting for it can copy it now

    # A few files at once, as snapshot_download does: one HTTP stream rarely fills a link. The
    # small files first: other nodes that lack them too may be waiting for this node's copies.
    order = sorted(missing, key=lambda hub_file: hub_file.size)
    with ThreadPoolExecutor(max_workers=PARALLEL_FILES, thread_name_prefix="exo-download") as pool:
        for future in [pool.submit(fetch, hub_file) for hub_file in order]:
            future.result()  # the first failure is raised (the others finish or fail on their own)
    installer.finish(missing)
    return target


def _staged_bytes(staging: Path, hub_file: HubFile) -> int:
    """Bytes of this file already in staging (complete, or an .incomplete part)."""
    for candidate in (staging / hub_file.path, part_path(staging, hub_file)):
        if candidate.is_file():
            return min(candidate.stat().st_size, hub_file.size)
    return 0


def _fetch_verified(
    staging: Path,
    model: HubModel,
    *,
    hub_file: HubFile,
    settings: HubSettings,
    report: ProgressCallback,
    source: FileSource | None,
) -> None:
    staged = staging / hub_file.path
    if staged.is_file():
        if verified(staged, hub_file):  # fetched before a restart, not yet moved into place
            report(hub_file.path, hub_file.size, hub_file.size)
            return
        staged.unlink()
    if hub_file.path == "config.json" and _write_described_config(staged, model, hub_file):
        report(hub_file.path, hub_file.size, hub_file.size)
        return
    if source is not None:
        # Peers append to the same part file the Hub download resumes from: bytes a dying peer
        # sent are not fetched again.
        part = part_path(staging, hub_file)
        if source(model, hub_file, part, report) and verified(part, hub_file):
            staged.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, staged)
            report(hub_file.path, hub_file.size, hub_file.size)
            return
        if part.exists() and part.stat().st_size >= hub_file.size:
            part.unlink()  # complete but wrong: the Hub's copy from the start
    for attempt in range(2):
        digest = _hub_download(staging, model, hub_file, settings, report, force=attempt > 0)
        complete = staged.is_file() and staged.stat().st_size == hub_file.size
        if complete and (hub_file.sha256 is None or (digest or sha256_of(staged)) == hub_file.sha256):
            report(hub_file.path, hub_file.size, hub_file.size)
            return
        staged.unlink(missing_ok=True)
    raise CorruptDownload(
        f"{model.repo_id}/{hub_file.path}: the downloaded file does not match the Hub's sha256 "
        f"({hub_file.sha256}) after a second try; nothing was installed"
    )


def _write_described_config(staged: Path, model: HubModel, hub_file: HubFile) -> bool:
    """config.json from the model's description (the bytes the describing node read from the Hub
    at this commit), when it has them at the Hub's size: the Hub is asked for it once per cluster
    (peers could copy it only at the end of a download, which installs it last)."""
    data = model.config_text.encode("utf-8")
    if not data or len(data) != hub_file.size:
        return False
    staged.parent.mkdir(parents=True, exist_ok=True)
    written = staged.with_name(f"{staged.name}.described")
    written.write_bytes(data)
    os.replace(written, staged)
    return True


def part_path(staging: Path, hub_file: HubFile) -> Path:
    """Where a file's bytes collect until it is complete; named by its content hash, so a part of
    another revision's file is never resumed into this one."""
    tag = (hub_file.sha256 or f"size{hub_file.size}")[:16]
    return staging / ".parts" / f"{hub_file.path}.{tag}.incomplete"


def _hub_download(
    staging: Path,
    model: HubModel,
    hub_file: HubFile,
    settings: HubSettings,
    report: ProgressCallback,
    *,
    force: bool,
) -> str | None:
    """Fetch one file with huggingface_hub's `http_get`, appending to its part file: a transfer
    that breaks (or a node killed mid-file) resumes from the bytes already there. (hf_hub_download
    itself drops a partial file when it fails, so it cannot resume across calls.) Returns the
    sha256 of the whole file, hashed as it was written (None when it could not be: then the
    caller hashes the file)."""
    if settings.offline:
        raise HubError(f"HF_HUB_OFFLINE is set: cannot fetch {model.repo_id}/{hub_file.path}")
    configure_huggingface_hub()
    from filelock import FileLock
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    path, total = hub_file.path, hub_file.size

    class Meter:
        """What http_get takes as its progress bar: it reports to `report` instead."""

        def __init__(self, **kwargs: Any) -> None:
            self.n = int(kwargs.get("initial") or 0)
            report(path, self.n, total)

        def update(self, count: int = 1) -> None:
            self.n += count
            report(path, min(self.n, total), total)

        def close(self) -> None:
            return

        def __enter__(self) -> Meter:
            return self

        def __exit__(self, *_exc: object) -> None:
            return

    part = part_path(staging, hub_file)
    part.parent.mkdir(parents=True, exist_ok=True)
    url = hf_hub_url(model.repo_id, hub_file.path, revision=model.commit, endpoint=settings.endpoint)
    headers = build_hf_headers(token=settings.token or False)
    with FileLock(f"{part}.lock"), hub_errors(model.repo_id, model.revision, settings):
        if force or (part.exists() and part.stat().st_size > total):
            part.unlink(missing_ok=True)
        digest = hashlib.sha256()
        if part.exists():
            with part.open("rb") as done:
                while chunk := done.read(HASH_CHUNK):
                    digest.update(chunk)
        with part.open("ab") as file:
            resume = file.tell()
            hashing = _HashingFile(file, digest)
            http_get(
                url, cast(Any, hashing), resume_size=resume, headers=headers, expected_size=total,
                displayed_filename=hub_file.path, tqdm_class=cast(Any, Meter),
            )  # fmt: skip
        staged = staging / hub_file.path
        staged.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, staged)
    return digest.hexdigest() if hashing.in_order else None


class _HashingFile:
    """The part file as http_get writes it, hashed on the way (no second read of the file).
    A seek or truncate (http_get restarting a file the server would not resume) spoils the hash."""

    def __init__(self, file: Any, digest: Any) -> None:
        self._file = file
        self._digest = digest
        self.in_order = True

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return int(self._file.write(data))

    def seek(self, *args: Any) -> int:
        self.in_order = False
        return int(self._file.seek(*args))

    def truncate(self, *args: Any) -> int:
        self.in_order = False
        return int(self._file.truncate(*args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class _Installer:
    """Moves verified files into the model folder one by one, as each is verified (so a peer can
    copy a file while the rest still downloads), the manifest listing each once it is there, and
    config.json last: a folder is a model only once every file it was fetching is in place."""

    def __init__(self, target: Path, staging: Path, model: HubModel) -> None:
        self.target = target
        self.staging = staging
        self.model = model
        self._lock = threading.Lock()
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob(f"{MANIFEST_NAME}.tmp-*"):
            stale.unlink(missing_ok=True)  # a manifest write cut short by a kill
        try:
            previous = read_manifest(target)
        except ValueError:
            previous = None
        held = set(held_files(target, previous)) if previous is not None else set()
        if previous is not None and previous.model.commit != model.commit:
            held = {path for path in held if _same_file(previous.model, model, path)}
        self.held = held
        self.installed: set[str] = set()

    def install(self, hub_file: HubFile) -> None:
        with self._lock:
            destination = self.target / hub_file.path
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / hub_file.path, destination)
            self.held.add(hub_file.path)
            self.installed.add(hub_file.path)
            write_manifest(self.target, Manifest(self.model, sorted(self.held)))

    def finish(self, files: list[HubFile]) -> None:
        for hub_file in sorted(files, key=lambda each: each.path == "config.json"):
            if hub_file.path not in self.installed:
                self.install(hub_file)
        write_manifest(self.target, Manifest(self.model, sorted(self.held)))
        shutil.rmtree(self.staging, ignore_errors=True)


def _same_file(old: HubModel, new: HubModel, path: str) -> bool:
    try:
        return old.file(path) == new.file(path)
    except KeyError:
        return False


def remove_model(models_dir: Path, model_id: str) -> bool:
    """Delete the model's folder and any staged download; whether there was anything to delete."""
    target = model_folder(models_dir, model_id)
    found = target.exists()
    if found:
        shutil.rmtree(target)
    if "/" in str(target.relative_to(models_dir)):
        staging = staging_folder(models_dir, str(target.relative_to(models_dir)))
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
            found = True
        parent = target.parent
        if parent != Path(models_dir) and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return found
