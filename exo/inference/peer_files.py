"""Model files between peers: what a node may serve, and how a fetch from peers proceeds.

A node serves only files its manifest lists as verified and in place, at the commit asked, so a
peer never receives a half-written or unverified file. The fetching side appends chunks to a
part file (a peer dying mid-file leaves the bytes received for the next peer, or the Hub, to
resume from) and the caller verifies the sha256 as it does for the Hub's bytes. Transport is the
caller's (`ask`): here only files and offsets, no sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exo.inference.manifest import HubFile, HubModel, held_files, read_manifest
from exo.inference.models import model_folder

CHUNK_BYTES = 4 * 1024 * 1024
MAX_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class FileRange:
    repo_id: str
    commit: str
    path: str
    offset: int
    length: int


# (peer node id, range) -> (data, file size), or None when the peer cannot serve it (does not
# hold it, died, timed out).
AskChunk = Callable[[str, FileRange], tuple[bytes, int] | None]
ProgressCallback = Callable[[str, int, int], None]


class NotServed(LookupError):
    """This node does not hold that file verified at that commit."""


def read_chunk(models_dir: Path, wanted: FileRange) -> tuple[bytes, int]:
    """Bytes of a verified file this node holds; NotServed otherwise. Blocking (a thread)."""
    repo_id, commit, path, offset, length = (
        wanted.repo_id, wanted.commit, wanted.path, wanted.offset, wanted.length
    )  # fmt: skip
    folder = model_folder(models_dir, repo_id)
    try:
        manifest = read_manifest(folder)
    except ValueError as error:
        raise NotServed(str(error)) from None
    if manifest is None or manifest.model.commit != commit or path not in held_files(folder, manifest):
        raise NotServed(f"{repo_id}@{commit[:12]}/{path} is not held here")
    size = manifest.model.file(path).size
    if offset < 0 or length < 0 or offset > size:
        raise NotServed(f"bad range {offset}+{length} of {size} bytes")
    with (folder / path).open("rb") as file:
        file.seek(offset)
        return file.read(min(length, MAX_CHUNK_BYTES)), size


def fetch_from_peers(
    peers: list[str],
    ask: AskChunk,
    model: HubModel,
    hub_file: HubFile,
    *,
    destination: Path,
    progress: ProgressCallback,
) -> bool:
    """Fill `destination` with the file from the first peer that serves it, resuming from its
    bytes (and moving on to the next peer when one stops answering). True when complete."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    for peer in peers:
        with destination.open("ab") as file:
            done = file.tell()
            while done < hub_file.size:
                answer = ask(peer, FileRange(model.repo_id, model.commit, hub_file.path, done, CHUNK_BYTES))
                if answer is None or answer[1] != hub_file.size or not answer[0]:
                    break  # this peer cannot go on: the next one resumes from `done`
                file.write(answer[0])
                done += len(answer[0])
                progress(hub_file.path, done, hub_file.size)
        if done >= hub_file.size:
            return True
    return False
