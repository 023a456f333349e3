"""Where a tensor instance's ranks go: pure functions, no I/O, no clock.

Every rank holds all layers, 1/N of each (mlx-lm's `shard`: attention heads, KV heads and MLP
columns split N ways), 1/N of the output head (its rows of the vocabulary, exo.inference's
vocab_shard) and the embedding whole, or 1/N of it when it is tied to the head. `place_tensor`
picks the fewest alive nodes (at least `min_nodes`) for which the heads split evenly and every node
holds its share, most available memory first, ties by node id; rank order is pick order (rank 0
takes the requests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from exo.core.events import ShardAssignment
from exo.core.models import ModelFootprint
from exo.core.placement import NodeVerdict, Placement, PlacementPreview, PlacementRefusal
from exo.core.state import NodeInfo
from exo.roles.placement import candidates_of, format_bytes, left_out_reasons, with_fallback


def place_tensor(
    footprint: ModelFootprint,
    nodes: Iterable[NodeInfo],
    min_nodes: int = 1,
    reserved_bytes_by_node: Mapping[str, int] | None = None,
) -> Placement | PlacementRefusal:
    """The tensor placement on the fewest nodes (at least `min_nodes`) that fits, or why none does;
    with a `fallback` footprint (`--weights-dtype auto`), the native representation when float32
    does not fit, as pipeline placement does."""
    return with_fallback(_place_tensor_one, footprint, nodes, min_nodes, reserved_bytes_by_node)


def _place_tensor_one(
    footprint: ModelFootprint,
    nodes: Iterable[NodeInfo],
    min_nodes: int = 1,
    reserved_bytes_by_node: Mapping[str, int] | None = None,
) -> Placement | PlacementRefusal:
    problem = _model_problem(footprint)
    if problem is not None:
        return PlacementRefusal(reasons=[problem], nodes=[])
    if min_nodes < 1:
        return PlacementRefusal(reasons=[f"min_nodes must be at least 1, got {min_nodes}"], nodes=[])
    candidates, left_out = candidates_of(nodes, reserved_bytes_by_node or {})
    if min_nodes > len(candidates):
        reason = f"min_nodes={min_nodes} but only {len(candidates)} node(s) alive"
        return PlacementRefusal(reasons=[reason, *left_out_reasons(left_out)], nodes=left_out)
    reasons: list[str] = []
    verdicts: list[NodeVerdict] = []
    for size in range(min_nodes, len(candidates) + 1):
        attempt = _place_on(footprint, [(c.node_id, c.available_bytes) for c in candidates[:size]])
        if isinstance(attempt, Placement):
            return attempt
        reasons.extend(f"on {size} node(s): {reason}" for reason in attempt.reasons)
        verdicts = attempt.nodes or verdicts
    return PlacementRefusal(reasons=[*reasons, *left_out_reasons(left_out)], nodes=[*verdicts, *left_out])


def tensor_previews(
    footprint: ModelFootprint,
    nodes: Iterable[NodeInfo],
    reserved_bytes_by_node: Mapping[str, int] | None = None,
) -> list[PlacementPreview]:
    """A tensor placement (or the reasons against one) for each node count up to the alive nodes."""
    candidates, left_out = candidates_of(nodes, reserved_bytes_by_node or {})
    problem = _model_problem(footprint)
    result: list[PlacementPreview] = []
    for size in range(1, len(candidates) + 1):
        if problem is not None:
            attempt: Placement | PlacementRefusal = PlacementRefusal(reasons=[problem], nodes=[])
        else:
            attempt = _place_on(footprint, [(c.node_id, c.available_bytes) for c in candidates[:size]])
        if isinstance(attempt, Placement):
            result.append(PlacementPreview(size, attempt, None, "Tensor"))
        else:
            refusal = PlacementRefusal(
                reasons=[*attempt.reasons, *left_out_reasons(left_out)], nodes=[*attempt.nodes, *left_out]
            )
            result.append(PlacementPreview(size, None, refusal, "Tensor"))
    return result


def _model_problem(footprint: ModelFootprint) -> str | None:
    if footprint.n_layers < 1:
        return f"model has {footprint.n_layers} layers; it needs at least 1"
    if not footprint.tensor_parallel:
        return "the model's family has no tensor-parallel implementation (mlx-lm's `shard`); use Pipeline"
    if footprint.attention_heads < 1 or footprint.kv_heads < 1:
        return "the model's config does not say its attention heads and KV heads"
    return None


def _divisibility_problem(footprint: ModelFootprint, size: int) -> str | None:
    if footprint.attention_heads % size:
        return f"{footprint.attention_heads} attention heads cannot be split evenly over {size} nodes"
    if footprint.kv_heads % size:
        return f"{footprint.kv_heads} KV heads cannot be split evenly over {size} nodes"
    return None


def _place_on(footprint: ModelFootprint, chosen: list[tuple[str, int]]) -> Placement | PlacementRefusal:
    """Ranks on exactly these nodes, in this order, if the heads split and every rank fits."""
    size = len(chosen)
    problem = _divisibility_problem(footprint, size)
    if problem is not None:
        return PlacementRefusal(reasons=[problem], nodes=[])
    needed = footprint.tensor_rank_bytes(size)
    what = f"1/{size} of every layer + embedding and head" if size > 1 else "the whole model"
    verdicts: list[NodeVerdict] = []
    reasons: list[str] = []
    for node_id, available in chosen:
        shortfall = max(0, needed - available)
        if shortfall:
            reason = (
                f"needs {format_bytes(needed)} for {what}, has {format_bytes(available)} available "
                f"(short by {format_bytes(shortfall)})"
            )
            reasons.append(f"{node_id}: {reason}")
        else:
            reason = f"fits {what}"
        verdicts.append(NodeVerdict(node_id, available, needed, shortfall, reason))
    if reasons:
        return PlacementRefusal(reasons=reasons, nodes=verdicts)
    n_layers = footprint.n_layers
    return Placement(
        shard_assignments={
            node_id: ShardAssignment(0, n_layers, n_layers, rank=rank, size=size)
            for rank, (node_id, _) in enumerate(chosen)
        },
        bytes_by_node={node_id: needed for node_id, _ in chosen},
        weights=footprint.weights,
    )
