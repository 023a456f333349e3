"""The models a node can serve: each subfolder of the models dir that has a config.json.

A model id is a folder name (`exo-tiny`) or a Hugging Face repo id (`org/name`, optionally
`org/name@revision`), which lives at `MODELS_DIR/org/name/` (downloaded, or put there by hand).
A downloaded model's folder also holds `.exo-hub.json` (exo/inference/manifest.py): what the Hub
said about its files, so a stage that fetched only its own weight files is still described whole.

Reads only config.json and the safetensors headers (no weights), so listing is cheap. Sizes come
from the headers: placement needs bytes per layer, and what the first stage (embeddings) and the
last stage (final norm, lm_head or the tied embeddings) carry besides.

Nothing here reads outside the models dir: names with path separators, `..` or a leading dot are
refused, and so is any folder or file whose resolved path leaves the models dir (a symlink out).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from exo.core.models import ModelInfo, WeightBytes
from exo.inference.qkernel import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, kernel_expected

# mlx-lm architectures whose model is the standard embed -> `model.layers` (one attention mask)
# -> norm -> lm_head, which is what exo.inference.shard runs a slice of.
SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Those whose mlx-lm Model has `shard(group)` (tensor parallelism; a test checks it against mlx-lm).
TENSOR_PARALLEL_ARCHITECTURES: frozenset[str] = frozenset({"llama", "mistral", "qwen2", "qwen3"})

LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,95}"
HUB_ID_PATTERN = re.compile(
    rf"^(?P<repo>{_SEGMENT}/{_SEGMENT})(?:@(?P<revision>[A-Za-z0-9_.\-/]{{1,128}}))?$"
)
_MAX_HEADER_BYTES = 100_000_000
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "U32": "uint32"}


class InvalidModelIdError(ValueError):
    """A model id that could name something outside the models dir."""


class ModelNotFoundError(LookupError):
    pass


def check_model_id(model_id: str) -> None:
    if ".." in model_id or not (MODEL_ID_PATTERN.match(model_id) or HUB_ID_PATTERN.match(model_id)):
        raise InvalidModelIdError(
            f"invalid model id {model_id!r}: a folder name (letters, digits, '_', '-', '.') or a "
            "Hugging Face repo id 'org/name' with an optional '@revision'; no '..', no leading '.'"
        )


def split_hub_id(model_id: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) for a Hub id `org/name[@revision]`; None for a folder name."""
    match = HUB_ID_PATTERN.match(model_id)
    if match is None or ".." in model_id:
        return None
    return match.group("repo"), match.group("revision")


def model_folder(models_dir: Path, model_id: str) -> Path:
    """Where `model_id` lives (or would): `MODELS_DIR/name` or `MODELS_DIR/org/name`."""
    check_model_id(model_id)
    hub = split_hub_id(model_id)
    return Path(models_dir) / (hub[0] if hub is not None else model_id)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def resolve_model_dir(models_dir: Path, model_id: str) -> Path:
    """The folder of `model_id`, checked to be a real model folder inside `models_dir`."""
    candidate = model_folder(models_dir, model_id)
    if not _inside(candidate, Path(models_dir)):
        raise InvalidModelIdError(f"model {model_id!r} points outside the models dir")
    if not (candidate / "config.json").is_file():
        raise ModelNotFoundError(f"no model {model_id!r} in {models_dir}")
    return candidate.resolve()


def read_safetensors_header(path: Path) -> dict[str, dict[str, object]]:
    """Tensor name -> {dtype, shape, data_offsets}, from the file's JSON header only."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path.name}: too short to be safetensors")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path.name}: header of {length} bytes is implausible")
        raw = file.read(length)
    if len(raw) != length:
        raise ValueError(f"{path.name}: truncated header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: header is not an object")
    header.pop("__metadata__", None)
    return header


def weight_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files (the same glob mlx-lm loads), all inside `model_dir`."""
    files = sorted(model_dir.glob("model*.safetensors"))
    for file in files:
        if not _inside(file, model_dir):
            raise ValueError(f"{file.name} is a link out of the model folder")
    return files


def layer_index(tensor_name: str) -> int | None:
    match = LAYER_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def unsupported_reason(config: dict[str, object]) -> str:
    """Why exo cannot run this config ("" when it can)."""
    architecture = config.get("model_type")
    if architecture not in SUPPORTED_ARCHITECTURES:
        return (
            f"architecture {architecture!r} is not supported for pipeline shards "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    if config.get("model_file") is not None:
        return "the model needs custom code (model_file), which exo does not run"
    if "quantization_config" in config and "quantization" not in config:
        return "only float weights or mlx-lm quantization are supported (found quantization_config)"
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and any(kind != "full_attention" for kind in layer_types):
        return "sliding-window attention layers are not supported yet"
    return ""


def _int(config: dict[str, object], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


class _Tally:
    def __init__(self, n_layers: int) -> None:
        self.layer_bytes = [0] * n_layers
        self.embedding_bytes = self.head_bytes = self.other_bytes = 0


def _quantized_bits(module: str, config: dict[str, object]) -> int | None:
    """The bits of an mlx-lm quantized module (its own entry in "quantization", else the default)."""
    quantization = config.get("quantization")
    if not isinstance(quantization, dict):
        return None
    own = quantization.get(module)
    bits = own.get("bits") if isinstance(own, dict) else quantization.get("bits")
    return bits if isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 32 else None


def _kernel_keeps_packed(module: str, config: dict[str, object]) -> bool:
    """Whether exo's CPU kernel computes this quantized linear layer from its packed bytes
    (exo.inference.qkernel): affine 4/8-bit, group 32/64/128, not an embedding."""
    quantization = config.get("quantization")
    if not isinstance(quantization, dict) or "embed_tokens" in module:
        return False
    own = quantization.get(module)
    settings = own if isinstance(own, dict) else quantization
    return (
        settings.get("mode", "affine") == "affine"
        and settings.get("bits") in SUPPORTED_BITS
        and settings.get("group_size") in SUPPORTED_GROUP_SIZES
    )


def _float32_bytes(
    name: str,
    dtype: str,
    size: int,
    tensors: dict[str, tuple[str, int]],
    config: dict[str, object],
    *,
    kernel: bool,
) -> int:
    """The bytes of tensor `name` once held as float32: half precision doubles; a packed quantized
    weight becomes 32/bits times its bytes, and its scales and biases go away, unless exo's CPU
    kernel (`kernel`: expected on this machine) keeps the layer packed, scales and all."""
    module, _, leaf = name.rpartition(".")
    packed = tensors.get(f"{module}.weight", ("", 0))[0] == "U32" and f"{module}.scales" in tensors
    if packed and kernel and _kernel_keeps_packed(module, config):
        return size
    if packed and leaf in ("scales", "biases"):
        return 0
    if packed and leaf == "weight":
        bits = _quantized_bits(module, config)
        if bits is None:
            raise ValueError(f"{name} is packed but config.json has no quantization bits for it")
        return size * 32 // bits
    return size * 2 if dtype in ("F16", "BF16") else size


def _dominant_dtype(dtype_bytes: dict[str, int]) -> str:
    """The dtype holding most bytes (uint32 for quantized models' packed weights)."""
    if not dtype_bytes:
        return "unknown"
    dominant = max(dtype_bytes, key=lambda key: dtype_bytes[key])
    return _DTYPE_NAMES.get(dominant, dominant.lower())


TensorSizes = list[tuple[str, str, int]]  # (tensor name, safetensors dtype, bytes)


def tensor_sizes(model_dir: Path) -> TensorSizes:
    """Every tensor of the model's weight files, from their headers."""
    files = weight_files(model_dir)
    if not files:
        raise ValueError("no model*.safetensors weights")
    sizes: TensorSizes = []
    for file in files:
        for name, entry in read_safetensors_header(file).items():
            offsets = entry.get("data_offsets")
            if not (isinstance(offsets, list) and len(offsets) == 2):
                raise ValueError(f"{file.name}: tensor {name} has no data_offsets")
            sizes.append((name, str(entry.get("dtype")), int(offsets[1]) - int(offsets[0])))
    return sizes


def read_model_info(model_dir: Path, model_id: str) -> ModelInfo:
    """Describe one model folder; a broken folder is described as unsupported, with the reason.

    A downloaded folder's tensors come from its manifest (the Hub's headers for every weight
    file), so a stage holding only some of the weight files describes the whole model."""
    from exo.inference.manifest import read_manifest  # the manifest module imports this one

    try:
        config = json.loads((model_dir / "config.json").read_text())
        manifest = read_manifest(model_dir)
        sizes = manifest.tensors if manifest is not None else tensor_sizes(model_dir)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        return _unreadable(model_id, str(model_dir), error)
    return describe_model(model_id, str(model_dir), config, sizes)


def _unreadable(model_id: str, path: str, error: Exception) -> ModelInfo:
    return ModelInfo(
        model_id=model_id, path=path, architecture="unknown", n_layers=0, hidden_size=0,
        vocab_size=0, dtype="unknown", total_weight_bytes=0, layer_bytes=[], embedding_bytes=0,
        head_bytes=0, other_bytes=0, tied_embeddings=False, supported=False,
        reason=f"unreadable model: {error}",
    )  # fmt: skip


def describe_model(model_id: str, path: str, config: object, sizes: TensorSizes) -> ModelInfo:
    """A model's description from its config and tensor sizes (local headers or the Hub's)."""
    try:
        if not isinstance(config, dict):
            raise ValueError("config.json is not an object")
        n_layers = _int(config, "num_hidden_layers")
        hidden_size = _int(config, "hidden_size")
        vocab_size = _int(config, "vocab_size")
        if not sizes:
            raise ValueError("no model*.safetensors weights")
        layer_bytes = [0] * n_layers
        embedding_bytes = head_bytes = other_bytes = 0
        float32 = _Tally(n_layers)
        dtype_bytes: dict[str, int] = {}
        tensors = {name: (dtype, size) for name, dtype, size in sizes}
        kernel = kernel_expected()
        for name, (dtype, size) in tensors.items():
            dtype_bytes[dtype] = dtype_bytes.get(dtype, 0) + size
            wide = _float32_bytes(name, dtype, size, tensors, config, kernel=kernel)
            index = layer_index(name)
            if index is not None:
                if index >= n_layers:
                    continue  # e.g. multi-token-prediction layers that mlx-lm drops
                layer_bytes[index] += size
                float32.layer_bytes[index] += wide
            elif "embed_tokens" in name:
                embedding_bytes += size
                float32.embedding_bytes += wide
            elif name.startswith("lm_head"):
                head_bytes += size
                float32.head_bytes += wide
            elif "rotary_emb" not in name:
                other_bytes += size
                float32.other_bytes += wide
    except ValueError as error:
        return _unreadable(model_id, path, error)
    config_dict: dict[str, object] = config
    reason = unsupported_reason(config_dict)
    tied = bool(config_dict.get("tie_word_embeddings", head_bytes == 0))
    return ModelInfo(
        model_id=model_id,
        path=path,
        architecture=str(config_dict.get("model_type")),
        n_layers=n_layers,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        dtype=_dominant_dtype(dtype_bytes),
        total_weight_bytes=sum(layer_bytes) + embedding_bytes + head_bytes + other_bytes,
        layer_bytes=layer_bytes,
        embedding_bytes=embedding_bytes,
        head_bytes=0 if tied else head_bytes,
        other_bytes=other_bytes,
        tied_embeddings=tied,
        supported=not reason,
        reason=reason,
        attention_heads=_optional_int(config, "num_attention_heads"),
        kv_heads=_optional_int(config, "num_key_value_heads") or _optional_int(config, "num_attention_heads"),
        tensor_parallel=config.get("model_type") in TENSOR_PARALLEL_ARCHITECTURES,
        float32=WeightBytes(
            layer_bytes=float32.layer_bytes,
            embedding_bytes=float32.embedding_bytes,
            head_bytes=0 if tied else float32.head_bytes,
            other_bytes=float32.other_bytes,
        ),
    )


def _optional_int(config: dict[str, object], key: str) -> int:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def list_models(models_dir: Path) -> list[ModelInfo]:
    """Every model folder in `models_dir`, sorted by id; folders that are not models are skipped."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    models: list[ModelInfo] = []
    for model_id, folder in _model_folders(root):
        models.append(read_model_info(folder.resolve(), model_id))
    return sorted(models, key=lambda model: model.model_id)


def _model_folders(root: Path) -> list[tuple[str, Path]]:
    """(model id, folder) of every `name/` and `org/name/` folder with a config.json."""
    found: list[tuple[str, Path]] = []
    for entry in sorted(root.iterdir()):
        if not MODEL_ID_PATTERN.match(entry.name) or not entry.is_dir() or not _inside(entry, root):
            continue  # hidden folders, e.g. downloads still being written
        if (entry / "config.json").is_file():
            if _inside(entry / "config.json", root):
                found.append((entry.name, entry))
            continue
        for inner in sorted(entry.iterdir()):
            model_id = f"{entry.name}/{inner.name}"
            if not HUB_ID_PATTERN.match(model_id) or not inner.is_dir():
                continue
            if (inner / "config.json").is_file() and _inside(inner / "config.json", root):
                found.append((model_id, inner))
    return found


def get_model(models_dir: Path, model_id: str) -> ModelInfo:
    model_dir = resolve_model_dir(models_dir, model_id)
    return read_model_info(model_dir, model_id)
