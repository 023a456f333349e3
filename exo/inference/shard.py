"""One pipeline stage of a model: layers [start, end), built with mlx-lm's own model classes.

mlx-lm builds the whole module tree (its arrays are lazy, so nothing is allocated), but only the
stage's tensors are ever read: `mx.load` on a safetensors file gives lazy arrays, the stage keeps
the names that belong to it, loads those into the tree and evaluates only its own modules. The rest
of the tree is dropped unevaluated. The first stage also holds the embeddings; the last the final
norm and lm_head (or the embeddings again when they are tied). A tensor rank (an mx.distributed
group) holds 1/N of every layer (mlx-lm's `shard`) and its rows of the vocabulary's head
(exo.inference.vocab_shard).

`forward(inputs, cache)` takes token ids (1, L) on the first stage and hidden states (1, L, H)
otherwise, and returns hidden states, or logits on the last stage. Running `model.model.layers` in
slices this way reproduces the full model's logits exactly.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from exo.inference.fuse import fuse_layers
from exo.inference.models import layer_index, unsupported_reason, weight_files
from exo.inference.vocab_shard import VocabShard
from exo.inference.weights import Representation, hold_as_float32


class ShardLoadError(ValueError):
    """The shard cannot be loaded; the message says why in terms a user can act on."""


class ShardSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    start_layer: int
    end_layer: int  # exclusive
    n_layers: int

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.end_layer == self.n_layers

    def validate(self) -> None:
        if not 0 <= self.start_layer < self.end_layer <= self.n_layers:
            raise ShardLoadError(
                f"invalid layer range [{self.start_layer}, {self.end_layer}) of {self.n_layers} layers"
            )


def tensor_in_shard(name: str, spec: ShardSpec, tied_embeddings: bool) -> bool:
    """Whether the (sanitized) checkpoint tensor `name` belongs to this stage."""
    index = layer_index(name)
    if index is not None:
        return spec.start_layer <= index < spec.end_layer
    if name.startswith("model.embed_tokens."):
        return spec.is_first or (spec.is_last and tied_embeddings)
    if name.startswith(("model.norm.", "lm_head.")):
        return spec.is_last
    raise ShardLoadError(f"unexpected tensor {name!r}: not a layer, embedding, norm or head")


# mlx-lm's own module names for the supported architectures (mlx_lm.utils.MODEL_REMAPPING)
_MODEL_MODULES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def supported_model_modules() -> list[str]:
    """The mlx-lm modules `model_classes` may import (a runner imports them before its LoadShard)."""
    return [f"mlx_lm.models.{name}" for name in sorted(set(_MODEL_MODULES.values()))]


def model_classes(config: dict[str, Any]) -> tuple[Any, Any]:
    """mlx-lm's Model and ModelArgs for the config, as mlx_lm.utils picks them (without importing
    mlx_lm.utils, whose tokenizer stack costs a runner seconds at start)."""
    module = importlib.import_module(f"mlx_lm.models.{_MODEL_MODULES[config['model_type']]}")
    return module.Model, module.ModelArgs


def _read_config(model_path: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_path / "config.json").read_text())
    except FileNotFoundError:
        raise ShardLoadError(f"no model at {model_path} (config.json missing)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ShardLoadError(f"unreadable config.json in {model_path}: {error}") from None
    if not isinstance(config, dict):
        raise ShardLoadError(f"config.json in {model_path} is not an object")
    return config


def _quantize_like_checkpoint(model: nn.Module, config: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """mlx-lm's quantized layout: quantize the modules the checkpoint has scales for."""
    quantization = config["quantization"]

    def quantized_here(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=quantized_here,
    )


def builds_beside_compute() -> bool:
    """Whether Python can build a pass's graph on another core than the one MLX computes it on:
    not in a process pinned to one core (`taskset -c N`), where both share the core."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    return cores > 1


class ShardModel:
    """The modules of one stage, and the names of the tensors it read."""

    def __init__(
        self,
        *,
        spec: ShardSpec,
        config: dict[str, Any],
        embed_tokens: nn.Module | None,  # nn.Embedding, or a tensor rank's VocabShard
        layers: Sequence[nn.Module],
        norm: nn.Module | None,
        head: Callable[[mx.array], mx.array] | None,
        loaded_tensor_names: list[str],
        weight_bytes: int,
        representation: Representation = "native",
    ) -> None:
        self.spec = spec
        self.config = config
        self.architecture = str(config["model_type"])
        self.hidden_size = int(config["hidden_size"])
        self.vocab_size = int(config["vocab_size"])
        self.embed_tokens = embed_tokens
        self.layers = list(layers)
        self.norm = norm
        self.head = head
        self.loaded_tensor_names = loaded_tensor_names
        self.weight_bytes = weight_bytes
        self.tensor_group: Any = None  # the mx.distributed group of a tensor rank
        self.model_path: Path | None = None  # the folder it was loaded from (its tokenizer, for grammars)
        self.representation: Representation = representation
        # Start each layer as soon as it is built (see `forward`) only where that can overlap.
        self.layer_async_eval = builds_beside_compute()

    def make_cache(self) -> list[KVCache]:
        """A fresh per-layer KV cache for one request."""
        return [KVCache() for _ in self.layers]

    def forward(self, inputs: mx.array, cache: Sequence[Any]) -> mx.array:
        first = self.embed_tokens is not None and self.spec.is_first
        hidden = self.embed_tokens(inputs) if first else inputs  # type: ignore[misc]
        mask = create_attention_mask(hidden, cache[0])
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            hidden = layer(hidden, mask, layer_cache)
            # Start computing each layer while Python builds the next one's graph. On MLX's CPU
            # backend an async_eval blocks until all but the last few queued ops have run, so one
            # async_eval per pass computes after its whole graph is built: a pipeline stage, which
            # cannot build ahead of its input, would add its build time to every token
            # (docs/benchmarks-inference.md). Same ops in the same order: the outputs are bit-identical.
            # On one core there is nothing to overlap, and each call costs ~0.2 ms of that core's
            # time (docs/benchmarks.md, Tensor parallelism): a pinned process skips it.
            if self.layer_async_eval:
                mx.async_eval(hidden)
        if not self.spec.is_last:
            return hidden
        assert self.norm is not None and self.head is not None
        return self.head(self.norm(hidden))


def shard_vocabulary(model: Any, *, tied: bool, group: Any) -> None:
    """Replace the output head with this rank's rows of the vocabulary (exo.inference.vocab_shard).
    Tied embeddings: the slice serves the lookup too, so the rank holds 1/N of the matrix; untied:
    the lookup keeps the whole embedding, the head is a slice."""
    vocab = int(model.args.vocab_size)
    if tied:
        model.model.embed_tokens = VocabShard(model.model.embed_tokens, vocab, group)
    else:
        model.lm_head = VocabShard(model.lm_head, vocab, group)


def load_shard(
    model_path: Path, spec: ShardSpec, representation: Representation = "native", *, group: Any = None
) -> ShardModel:
    """Build the model class mlx-lm would, and materialize only this stage's tensors, as the
    checkpoint has them (`native`) or as float32 (half precision upcast, quantized layers
    dequantized; see exo.inference.weights); with an mx.distributed `group`, only this rank's 1/N
    of every layer (mlx-lm's `model.shard` on the lazy arrays: the other ranks' parts are never
    materialized here, nor upcast)."""
    model_path = Path(model_path)
    spec.validate()
    config = _read_config(model_path)
    reason = unsupported_reason(config)
    if reason:
        raise ShardLoadError(reason)
    if config.get("num_hidden_layers") != spec.n_layers:
        raise ShardLoadError(
            f"the model has {config.get('num_hidden_layers')} layers, the shard says {spec.n_layers}"
        )
    try:
        files = weight_files(model_path)
    except ValueError as error:
        raise ShardLoadError(str(error)) from None
    if not files:
        raise ShardLoadError(f"no model*.safetensors weights in {model_path}")

    model_class, args_class = model_classes(config)
    model: Any = model_class(args_class.from_dict(config))
    weights: dict[str, mx.array] = {}
    for file in files:
        loaded = mx.load(str(file))  # lazy: nothing is read until an array is evaluated
        assert isinstance(loaded, dict)
        weights.update(loaded)
        del loaded  # its arrays must not outlive the model's: fusing replaces some (docs/inference.md)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if config.get("quantization") is not None:
        _quantize_like_checkpoint(model, config, weights)
    tied = bool(getattr(model.args, "tie_word_embeddings", False))

    wanted = {name: array for name, array in weights.items() if tensor_in_shard(name, spec, tied)}
    del weights
    parameters = dict(tree_flatten(model.parameters()))
    expected = {name for name in parameters if tensor_in_shard(name, spec, tied)}
    missing, unexpected = expected - wanted.keys(), wanted.keys() - parameters.keys()
    if missing or unexpected:
        raise ShardLoadError(
            f"checkpoint does not match the {config['model_type']} model for layers "
            f"[{spec.start_layer}, {spec.end_layer}): missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name, array in wanted.items():
        if array.shape != parameters[name].shape:
            raise ShardLoadError(
                f"tensor {name} has shape {array.shape}, the config implies {parameters[name].shape}"
            )
    model.load_weights(list(wanted.items()), strict=False)
    loaded_tensor_names = sorted(wanted)
    del wanted  # the model holds the arrays now: an upcast can free each source once converted
    if group is not None:
        if not callable(getattr(model, "shard", None)):
            raise ShardLoadError(f"mlx-lm's {config['model_type']} model has no tensor-parallel shard")
        model.shard(group)
        if spec.is_first and spec.is_last:  # a tensor rank runs every layer
            shard_vocabulary(model, tied=tied, group=group)
    if representation == "float32":
        hold_as_float32(model)
    if group is None:  # a tensor rank's linears are split per rank already (exo.inference.fuse)
        fuse_layers(model.model.layers[spec.start_layer : spec.end_layer])

    inner = model.model
    embed_tokens = inner.embed_tokens if (spec.is_first or (spec.is_last and tied)) else None
    layers = list(inner.layers[spec.start_layer : spec.end_layer])
    norm = inner.norm if spec.is_last else None
    head: Callable[[mx.array], mx.array] | None = None
    if spec.is_last:
        source = inner.embed_tokens if tied else model.lm_head
        head = source.as_linear if tied or isinstance(source, VocabShard) else source
    kept: list[nn.Module] = [*layers]
    for module in (embed_tokens, norm, None if tied else (model.lm_head if spec.is_last else None)):
        if module is not None:
            kept.append(module)
    arrays: list[mx.array] = [
        array
        for module in kept
        for _, array in tree_flatten(module.parameters())
        if isinstance(array, mx.array)
    ]
    mx.eval(arrays)
    shard = ShardModel(
        spec=spec,
        config=config,
        embed_tokens=embed_tokens,
        layers=layers,
        norm=norm,
        head=head,
        loaded_tensor_names=loaded_tensor_names,
        weight_bytes=sum(array.nbytes for array in arrays),
        representation=representation,
    )
    shard.model_path = model_path
    shard.tensor_group = group
    return shard
