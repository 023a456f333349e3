"""What the cluster knows about a model: its shape and sizes (ModelInfo, read from its files by
exo.inference.models) and the memory its pipeline stages need (ModelFootprint, what placement uses)."""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

# `--weights-dtype`: what a stage holds on MLX's CPU backend (docs/inference.md).
WeightsDtype = Literal["auto", "float32", "native"]
# What a stage actually holds: "float32" after an upcast / dequantization, or the checkpoint's own.
Representation = Literal["float32", "native"]
WEIGHTS_DTYPES: tuple[str, ...] = get_args(WeightsDtype)


def representation_for(
    weights_dtype: WeightsDtype, *, placed: Representation | None = None, accelerator: bool
) -> Representation:
    """The representation a stage holds, from the flag and what placement chose (`placed`: None
    when placement made no choice). An explicit flag wins; `auto` follows placement, then the backend."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    if weights_dtype != "auto":
        return weights_dtype
    if placed is not None:
        return placed
    return "native" if accelerator else "float32"


class WeightBytes(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The bytes of a model's weights in one representation, split as ModelInfo splits them."""

    layer_bytes: list[int]
    embedding_bytes: int
    head_bytes: int
    other_bytes: int


class ModelInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model_id: str
    path: str
    architecture: str
    n_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    total_weight_bytes: int
    layer_bytes: list[int]  # one entry per layer, in order
    embedding_bytes: int
    head_bytes: int  # lm_head; 0 when tied to the embeddings
    other_bytes: int  # final norm and anything else outside the layers
    tied_embeddings: bool
    supported: bool
    reason: str  # why not supported; "" when supported
    # What tensor parallelism needs to know: heads split evenly over the ranks, and whether
    # mlx-lm's class for the family has `shard` (0 / False when unknown).
    attention_heads: int = 0
    kv_heads: int = 0
    tensor_parallel: bool = False
    # The same weights held as float32 (half precision upcast, quantized layers dequantized), which
    # is what a runner on MLX's CPU backend holds; None when not computed (then as the file).
    float32: WeightBytes | None = None

    def shard_weight_bytes(self, start_layer: int, end_layer: int) -> int:
        """Bytes a stage holding layers [start_layer, end_layer) loads."""
        total = sum(self.layer_bytes[start_layer:end_layer])
        first, last = start_layer == 0, end_layer == self.n_layers
        if first:
            total += self.embedding_bytes
        if last:
            total += self.other_bytes + self.head_bytes
            if self.tied_embeddings and not first:
                total += self.embedding_bytes
        return total


class ModelFootprint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The memory a model needs, split the way pipeline stages hold it.

    `layer_bytes` has one entry per layer. The first stage also holds `embedding_bytes`, the last
    stage `head_bytes` (final norm, lm_head); with `tied_embeddings` the last stage needs the
    embedding matrix too (as its output head) unless it is also the first stage.
    """

    layer_bytes: list[int]
    embedding_bytes: int = 0
    head_bytes: int = 0
    tied_embeddings: bool = False
    attention_heads: int = 0  # 0: unknown (a tensor placement is then refused)
    kv_heads: int = 0
    tensor_parallel: bool = False  # the family's mlx-lm class has `shard`
    # The representation these bytes are of (None: not said), and, for `--weights-dtype auto`,
    # the smaller native footprint placement falls back to when float32 does not fit.
    weights: Representation | None = None
    fallback: ModelFootprint | None = None

    @classmethod
    def uniform(
        cls, n_layers: int, layer_bytes: int, embedding_bytes: int = 0, head_bytes: int = 0
    ) -> ModelFootprint:
        return cls([layer_bytes] * n_layers, embedding_bytes, head_bytes)

    @classmethod
    def of_model(
        cls, model: ModelInfo, weights_dtype: WeightsDtype = "native", *, accelerator: bool = False
    ) -> ModelFootprint:
        """The bytes a runner with this `--weights-dtype` holds (on a GPU backend when
        `accelerator`): float32 after an upcast is twice a bfloat16 file, a dequantized 4-bit
        layer about six times its packed bytes."""
        native = cls(
            layer_bytes=list(model.layer_bytes),
            embedding_bytes=model.embedding_bytes,
            head_bytes=model.head_bytes + model.other_bytes,
            tied_embeddings=model.tied_embeddings,
            attention_heads=model.attention_heads,
            kv_heads=model.kv_heads,
            tensor_parallel=model.tensor_parallel,
            weights="native",
        )
        if representation_for(weights_dtype, accelerator=accelerator) == "native":
            return native
        wide = model.float32
        if wide is None:
            return msgspec.structs.replace(native, weights="float32")
        upcast = cls(
            layer_bytes=list(wide.layer_bytes),
            embedding_bytes=wide.embedding_bytes,
            head_bytes=wide.head_bytes + wide.other_bytes,
            tied_embeddings=model.tied_embeddings,
            attention_heads=model.attention_heads,
            kv_heads=model.kv_heads,
            tensor_parallel=model.tensor_parallel,
            weights="float32",
        )
        if weights_dtype == "auto" and upcast.total_bytes > native.total_bytes:
            return msgspec.structs.replace(upcast, fallback=native)
        return upcast

    def held_as(self, weights: Representation | None) -> ModelFootprint:
        """The footprint of the representation an instance was placed with."""
        if weights == "native" and self.fallback is not None:
            return self.fallback
        return self

    @property
    def n_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def total_bytes(self) -> int:
        """What the model needs on a single node."""
        return sum(self.layer_bytes) + self.embedding_bytes + self.head_bytes

    def stage_bytes(self, start_layer: int, end_layer: int) -> int:
        """What the stage holding layers `[start_layer, end_layer)` needs."""
        fixed = self.fixed_bytes(first=start_layer == 0, last=end_layer == self.n_layers)
        return sum(self.layer_bytes[start_layer:end_layer]) + fixed

    def tensor_rank_bytes(self, size: int) -> int:
        """What one of `size` tensor ranks needs: 1/size of every layer (mlx-lm's `shard`) and of
        the output head (its rows of the vocabulary), rounded up; tied embeddings are that head,
        so 1/size of them, else the embedding stays whole (the lookup reads it on every rank).
        The final norm, counted with the head, is split too: off by its few KB and one row."""
        share = -(-sum(self.layer_bytes) // size)
        if self.tied_embeddings:
            return share + -(-self.embedding_bytes // size) + self.head_bytes
        return share + self.embedding_bytes + -(-self.head_bytes // size)

    def fixed_bytes(self, *, first: bool, last: bool) -> int:
        """What a stage holds besides its layers."""
        fixed = self.embedding_bytes if first else 0
        if last:
            fixed += self.head_bytes + (self.embedding_bytes if self.tied_embeddings and not first else 0)
        return fixed
