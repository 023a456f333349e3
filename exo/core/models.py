"""What the cluster knows about a model: its shape and sizes (ModelInfo, read from its files by
exo.inference.models) and the memory its pipeline stages need (ModelFootprint, what placement uses)."""

from __future__ import annotations

import msgspec


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

    @classmethod
    def uniform(
        cls, n_layers: int, layer_bytes: int, embedding_bytes: int = 0, head_bytes: int = 0
    ) -> ModelFootprint:
        return cls([layer_bytes] * n_layers, embedding_bytes, head_bytes)

    @classmethod
    def of_model(cls, model: ModelInfo) -> ModelFootprint:
        return cls(
            layer_bytes=list(model.layer_bytes),
            embedding_bytes=model.embedding_bytes,
            head_bytes=model.head_bytes + model.other_bytes,
            tied_embeddings=model.tied_embeddings,
        )

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

    def fixed_bytes(self, *, first: bool, last: bool) -> int:
        """What a stage holds besides its layers."""
        fixed = self.embedding_bytes if first else 0
        if last:
            fixed += self.head_bytes + (self.embedding_bytes if self.tied_embeddings and not first else 0)
        return fixed
