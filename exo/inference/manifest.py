"""What a downloaded model folder holds: `.exo-hub.json`, written beside the files it describes.

The Hub's answer (files, sizes, sha256, every tensor's size and file) is kept so that a node that
fetched only its stage's weight files still knows the whole model (placement math, listing), which
files it holds, and which it would need for another stage. Files are listed here only once they
are verified and in place, so the manifest never claims a half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec

from exo.inference.models import LAYER_PATTERN

MANIFEST_NAME = ".exo-hub.json"
INDEX_NAME = "model.safetensors.index.json"
# Besides the weights, what mlx-lm and transformers read from a model folder.
SUPPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        INDEX_NAME,
    }
)


class HubFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One file of a Hub repo: `sha256` is the LFS sha256 (weights), None for small git files."""

    path: str
    size: int
    sha256: str | None = None


class HubModel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A model on the Hub at one commit: the files exo needs and every tensor's size and file."""

    repo_id: str
    revision: str  # as asked ("main", a tag, a commit)
    commit: str
    files: list[HubFile]  # the needed files only: support files and weights
    tensors: list[tuple[str, str, int]]  # (name, dtype, bytes)
    weight_map: dict[str, str]  # tensor name -> weight file
    config: dict[str, object]
    # config.json as the Hub served it to the node that read this description (for the
    # placement): a node fetching the model writes it from here, so the cluster asks the Hub for
    # it once. Empty in descriptions written before it was kept (then it is fetched).
    config_text: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(hub_file.size for hub_file in self.files)

    def file(self, path: str) -> HubFile:
        for hub_file in self.files:
            if hub_file.path == path:
                return hub_file
        raise KeyError(path)


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: HubModel
    held: list[str]  # files verified and in place

    @property
    def tensors(self) -> list[tuple[str, str, int]]:
        return self.model.tensors


def is_weight_file(path: str) -> bool:
    return path.endswith(".safetensors") and "/" not in path


def needed_files(model: HubModel, layers: tuple[int, int] | None = None) -> list[HubFile]:
    """The files a node needs: every support file, and the weight files holding the tensors of
    layers `[start, end)` (with the embedding on the first stage, and the final norm, lm_head or
    the tied embedding on the last); all weight files when `layers` is None."""
    n_layers = _int(model.config.get("num_hidden_layers"))
    tied = bool(model.config.get("tie_word_embeddings", False))
    wanted: set[str] = set()
    if layers is not None:
        start, end = layers
        for tensor, weight_file in model.weight_map.items():
            if _tensor_needed(tensor, start, end, n_layers, tied):
                wanted.add(weight_file)
    return [
        hub_file
        for hub_file in model.files
        if not is_weight_file(hub_file.path) or layers is None or hub_file.path in wanted
    ]


def _tensor_needed(name: str, start: int, end: int, n_layers: int, tied: bool) -> bool:
    match = LAYER_PATTERN.search(name)
    if match is not None:
        return start <= int(match.group(1)) < end
    first, last = start == 0, end >= n_layers
    if "embed_tokens" in name:
        return first or (last and tied)
    return last


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


_decoder = msgspec.json.Decoder(Manifest)


def read_manifest(model_dir: Path) -> Manifest | None:
    """The folder's manifest; None for a folder put there by hand. ValueError when unreadable."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as error:
        raise ValueError(f"{MANIFEST_NAME}: {error}") from None


def write_manifest(model_dir: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically (written beside it, then renamed)."""
    path = Path(model_dir) / MANIFEST_NAME
    temporary = path.with_name(f"{MANIFEST_NAME}.tmp-{os.getpid()}")
    temporary.write_bytes(msgspec.json.encode(manifest))
    os.replace(temporary, path)


def held_files(model_dir: Path, manifest: Manifest) -> list[str]:
    """The manifest's verified files that are still there at their size."""
    held: list[str] = []
    for path in manifest.held:
        try:
            hub_file = manifest.model.file(path)
        except KeyError:
            continue
        file = Path(model_dir) / path
        if file.is_file() and file.stat().st_size == hub_file.size:
            held.append(path)
    return held


def is_complete(model_dir: Path) -> bool:
    """Whether the folder holds every file of its model (always, for a folder without a manifest)."""
    try:
        manifest = read_manifest(model_dir)
    except ValueError:
        return False
    if manifest is None:
        return True
    held = set(held_files(model_dir, manifest))
    return all(hub_file.path in held for hub_file in manifest.model.files)


def weight_map_of(index_text: str) -> dict[str, str]:
    """The tensor -> file map of a model.safetensors.index.json."""
    index = json.loads(index_text)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items()
    ):
        raise ValueError(f"{INDEX_NAME} has no weight_map of tensor names to files")
    return dict(weight_map)
