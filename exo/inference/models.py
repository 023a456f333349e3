"""The models a node can serve: each subfolder of the models dir that has a config.json.

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

# mlx-lm architectures whose model is the standard embed -> `model.layers` (one attention mask)
# -> norm -> lm_head, which is what exo.inference.shard runs a slice of.
SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Those whose mlx-lm Model has `shard(group)` (tensor parallelism; a test checks it against mlx-lm).
TENSOR_PARALLEL_ARCHITECTURES: frozenset[str] = frozenset({"llama", "mistral", "qwen2", "qwen3"})

LAYER_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_MAX_HEADER_BYTES = 100_000_000
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "U32": "uint32"}


class InvalidModelIdError(ValueError):
    """A model id that could name something outside the models dir."""


class ModelNotFoundError(LookupError):
    pass


def check_model_id(model_id: str) -> None:
    if not MODEL_ID_PATTERN.match(model_id) or ".." in model_id:
        raise InvalidModelIdError(
            f"invalid model id {model_id!r}: use letters, digits, '_', '-', '.'; no '/', no '..', "
            "no leading '.'"
        )


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def resolve_model_dir(models_dir: Path, model_id: str) -> Path:
    """The folder of `model_id`, checked to be a real model folder inside `models_dir`."""
    check_model_id(model_id)
    candidate = Path(models_dir) / model_id
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


def _tensor_entries(file: Path) -> list[tuple[str, tuple[str, int]]]:
    """(name, (safetensors dtype, bytes)) of every tensor in the file, from its header."""
    entries: list[tuple[str, tuple[str, int]]] = []
    for name, entry in read_safetensors_header(file).items():
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise ValueError(f"{file.name}: tensor {name} has no data_offsets")
        entries.append((name, (str(entry.get("dtype")), int(offsets[1]) - int(offsets[0]))))
    return entries


def _quantized_bits(module: str, config: dict[str, object]) -> int | None:
    """The bits of an mlx-lm quantized module (its own entry in "quantization", else the default)."""
    quantization = config.get("quantization")
    if not isinstance(quantization, dict):
        return None
    own = quantization.get(module)
    bits = own.get("bits") if isinstance(own, dict) else quantization.get("bits")
    return bits if isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 32 else None


def _float32_bytes(
    name: str, dtype: str, size: int, tensors: dict[str, tuple[str, int]], config: dict[str, object]
) -> int:
    """The bytes of tensor `name` once held as float32: half precision doubles; a packed quantized
    weight becomes 32/bits times its bytes, and its scales and biases go away."""
    module, _, leaf = name.rpartition(".")
    packed = tensors.get(f"{module}.weight", ("", 0))[0] == "U32" and f"{module}.scales" in tensors
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


def read_model_info(model_dir: Path, model_id: str) -> ModelInfo:
    """Describe one model folder; a broken folder is described as unsupported, with the reason."""
    path = str(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("config.json is not an object")
        n_layers = _int(config, "num_hidden_layers")
        hidden_size = _int(config, "hidden_size")
        vocab_size = _int(config, "vocab_size")
        files = weight_files(model_dir)
        if not files:
            raise ValueError("no model*.safetensors weights")
        layer_bytes = [0] * n_layers
        embedding_bytes = head_bytes = other_bytes = 0
        float32 = _Tally(n_layers)
        dtype_bytes: dict[str, int] = {}
        tensors = {name: entry for file in files for name, entry in _tensor_entries(file)}
        for name, (dtype, size) in tensors.items():
            dtype_bytes[dtype] = dtype_bytes.get(dtype, 0) + size
            wide = _float32_bytes(name, dtype, size, tensors, config)
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
    except (OSError, ValueError, json.JSONDecodeError) as error:
        return ModelInfo(
            model_id=model_id, path=path, architecture="unknown", n_layers=0, hidden_size=0,
            vocab_size=0, dtype="unknown", total_weight_bytes=0, layer_bytes=[], embedding_bytes=0,
            head_bytes=0, other_bytes=0, tied_embeddings=False, supported=False,
            reason=f"unreadable model: {error}",
        )  # fmt: skip
    reason = unsupported_reason(config)
    tied = bool(config.get("tie_word_embeddings", head_bytes == 0))
    return ModelInfo(
        model_id=model_id,
        path=path,
        architecture=str(config.get("model_type")),
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
    for entry in sorted(root.iterdir()):
        try:
            check_model_id(entry.name)
        except InvalidModelIdError:
            continue  # hidden folders, e.g. a model still being written
        if not entry.is_dir() or not _inside(entry, root) or not (entry / "config.json").is_file():
            continue
        if not _inside(entry / "config.json", root):
            continue
        models.append(read_model_info(entry.resolve(), entry.name))
    return models


def get_model(models_dir: Path, model_id: str) -> ModelInfo:
    model_dir = resolve_model_dir(models_dir, model_id)
    return read_model_info(model_dir, model_id)
