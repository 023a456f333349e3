"""Where an instance's pipeline stages go: pure functions, no I/O, no clock.

A model is `n_layers` transformer layers of `layer_bytes` each, plus the embedding (first stage only)
and the output head (last stage only). `place` picks the fewest alive nodes (at least `min_nodes`)
whose memory holds the model, most available memory first, and splits the layers between them in
proportion to the memory each has left for layers, by the largest remainder method (every node gets
at least one layer). Pipeline order is the order the nodes were picked in.

Everything is integer arithmetic and every tie breaks on node id, so the same inputs give the same
placement on every node (a new master re-placing after failover agrees with the old one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from exo.events import ShardAssignment
from exo.state import NodeInfo


class ModelFootprint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The memory a model needs, split the way pipeline stages hold it."""

    n_layers: int
    layer_bytes: int
    embedding_bytes: int = 0
    head_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.n_layers * self.layer_bytes + self.embedding_bytes + self.head_bytes


class Placement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A feasible placement. Both dicts are in pipeline order (first stage first)."""

    shard_assignments: dict[str, ShardAssignment]
    bytes_by_node: dict[str, int]

    @property
    def node_ids(self) -> list[str]:
        return list(self.shard_assignments)


class NodeVerdict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One node's part in a refused placement: what it would have needed, or why it was left out."""

    node_id: str
    available_bytes: int
    needed_bytes: int
    shortfall_bytes: int
    reason: str


class PlacementRefusal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Why no placement exists: one line per cause, and the per-node detail behind them."""

    reasons: list[str]
    nodes: list[NodeVerdict]


class PlacementPreview(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a placement on exactly `n_nodes` nodes would look like, or why there is none."""

    n_nodes: int
    placement: Placement | None
    refusal: PlacementRefusal | None


class _Candidate(msgspec.Struct, frozen=True):
    node_id: str
    available_bytes: int


def place(
    footprint: ModelFootprint,
    nodes: Iterable[NodeInfo],
    min_nodes: int = 1,
    reserved_bytes_by_node: Mapping[str, int] | None = None,
) -> Placement | PlacementRefusal:
    """The placement on the fewest nodes (at least `min_nodes`) that fits, or why none does.

    `reserved_bytes_by_node` is memory already promised to instances whose runners have not loaded
    yet (so not visible in the nodes' measured available memory); it is subtracted first.
    """
    problem = _check_footprint(footprint)
    if problem is not None:
        return PlacementRefusal(reasons=[problem], nodes=[])
    if min_nodes < 1:
        return PlacementRefusal(reasons=[f"min_nodes must be at least 1, got {min_nodes}"], nodes=[])
    candidates, left_out = _candidates(nodes, reserved_bytes_by_node or {})
    if min_nodes > len(candidates):
        reason = f"min_nodes={min_nodes} but only {len(candidates)} node(s) alive"
        verdicts = [
            *left_out,
            *(_unused(candidate, "alive but too few alive nodes") for candidate in candidates),
        ]
        return PlacementRefusal(reasons=[reason, *_left_out_reasons(left_out)], nodes=verdicts)
    if min_nodes > footprint.n_layers:
        reason = f"min_nodes={min_nodes} exceeds the model's {footprint.n_layers} layer(s)"
        return PlacementRefusal(reasons=[reason], nodes=left_out)
    largest_count = min(len(candidates), footprint.n_layers)
    for node_count in range(min_nodes, largest_count + 1):
        attempt = _place_on(footprint, candidates[:node_count])
        if isinstance(attempt, Placement):
            return attempt
    # Report the widest attempt: it has the most memory, so its shortfalls are the real ones.
    refusal = _place_on(footprint, candidates[:largest_count])
    assert isinstance(refusal, PlacementRefusal)
    unused = [
        _unused(candidate, "not used: the model has fewer layers than there are nodes")
        for candidate in candidates[largest_count:]
    ]
    total_available = sum(candidate.available_bytes for candidate in candidates)
    summary = (
        f"model needs {format_bytes(footprint.total_bytes)} in all; "
        f"{len(candidates)} alive node(s) have {format_bytes(total_available)} available"
    )
    return PlacementRefusal(
        reasons=[summary, *refusal.reasons, *_left_out_reasons(left_out)],
        nodes=[*refusal.nodes, *unused, *left_out],
    )


def previews(
    footprint: ModelFootprint,
    nodes: Iterable[NodeInfo],
    reserved_bytes_by_node: Mapping[str, int] | None = None,
) -> list[PlacementPreview]:
    """A placement (or the reasons against one) for each node count from 1 to the number of alive nodes."""
    nodes = list(nodes)
    candidates, left_out = _candidates(nodes, reserved_bytes_by_node or {})
    problem = _check_footprint(footprint)
    result: list[PlacementPreview] = []
    for node_count in range(1, len(candidates) + 1):
        if problem is not None:
            attempt: Placement | PlacementRefusal = PlacementRefusal(reasons=[problem], nodes=[])
        elif node_count > footprint.n_layers:
            reason = f"{footprint.n_layers} layer(s) cannot be split over {node_count} nodes"
            attempt = PlacementRefusal(reasons=[reason], nodes=[])
        else:
            attempt = _place_on(footprint, candidates[:node_count])
        if isinstance(attempt, Placement):
            result.append(PlacementPreview(n_nodes=node_count, placement=attempt, refusal=None))
        else:
            refusal = PlacementRefusal(
                reasons=[*attempt.reasons, *_left_out_reasons(left_out)], nodes=[*attempt.nodes, *left_out]
            )
            result.append(PlacementPreview(n_nodes=node_count, placement=None, refusal=refusal))
    return result


def split_layers(n_layers: int, weights: list[int]) -> list[int]:
    """Split `n_layers` in proportion to `weights` by the largest remainder method, at least one each.

    Ties go to the earlier weight. Needs `1 <= len(weights) <= n_layers`; negative weights count as 0.
    """
    if not 1 <= len(weights) <= n_layers:
        raise ValueError(f"cannot split {n_layers} layer(s) over {len(weights)} node(s)")
    weights = [max(0, weight) for weight in weights]
    total_weight = sum(weights)
    if total_weight == 0:
        weights = [1] * len(weights)
        total_weight = len(weights)
    counts = [n_layers * weight // total_weight for weight in weights]
    remainders = [n_layers * weight % total_weight for weight in weights]
    leftover = n_layers - sum(counts)
    by_remainder = sorted(range(len(weights)), key=lambda position: (-remainders[position], position))
    for position in by_remainder[:leftover]:
        counts[position] += 1
    # A node whose share rounds to zero takes one layer from the node furthest above its quota.
    for position in range(len(counts)):
        if counts[position] == 0:
            donor = max(
                (other for other in range(len(counts)) if counts[other] > 1),
                key=lambda other: (counts[other] * total_weight - n_layers * weights[other], -other),
            )
            counts[donor] -= 1
            counts[position] = 1
    return counts


def format_bytes(count: int) -> str:
    sign = "-" if count < 0 else ""
    value = float(abs(count))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _check_footprint(footprint: ModelFootprint) -> str | None:
    if footprint.n_layers < 1:
        return f"model has {footprint.n_layers} layers; it needs at least 1"
    if min(footprint.layer_bytes, footprint.embedding_bytes, footprint.head_bytes) < 0:
        return "model byte counts must not be negative"
    return None


def _candidates(
    nodes: Iterable[NodeInfo], reserved_bytes_by_node: Mapping[str, int]
) -> tuple[list[_Candidate], list[NodeVerdict]]:
    """Alive nodes, most available memory first (ties by node id), and verdicts for the rest."""
    candidates: list[_Candidate] = []
    left_out: list[NodeVerdict] = []
    for node in sorted(nodes, key=lambda node: node.node_id):
        available = node.memory_available_bytes - reserved_bytes_by_node.get(node.node_id, 0)
        if node.status != "alive":
            left_out.append(NodeVerdict(node.node_id, max(0, available), 0, 0, f"node is {node.status}"))
        else:
            candidates.append(_Candidate(node.node_id, max(0, available)))
    candidates.sort(key=lambda candidate: (-candidate.available_bytes, candidate.node_id))
    return candidates, left_out


def _place_on(footprint: ModelFootprint, chosen: list[_Candidate]) -> Placement | PlacementRefusal:
    """Split the model over exactly these nodes, in this pipeline order, and check that it fits."""
    last = len(chosen) - 1
    fixed = [_fixed_bytes(footprint, position, last) for position in range(len(chosen))]
    layer_room = [candidate.available_bytes - fixed[position] for position, candidate in enumerate(chosen)]
    counts = split_layers(footprint.n_layers, layer_room)
    counts = _move_layers_to_fit(counts, layer_room, footprint.layer_bytes)
    needed = [fixed[position] + counts[position] * footprint.layer_bytes for position in range(len(chosen))]
    overflowing = [
        position for position in range(len(chosen)) if needed[position] > chosen[position].available_bytes
    ]
    ranges = _layer_ranges(counts)
    if not overflowing:
        return Placement(
            shard_assignments={
                candidate.node_id: ShardAssignment(start, end, footprint.n_layers)
                for candidate, (start, end) in zip(chosen, ranges, strict=True)
            },
            bytes_by_node={candidate.node_id: needed[position] for position, candidate in enumerate(chosen)},
        )
    verdicts: list[NodeVerdict] = []
    reasons: list[str] = []
    for position, candidate in enumerate(chosen):
        shortfall = max(0, needed[position] - candidate.available_bytes)
        what = _stage_description(ranges[position], position, last)
        if shortfall:
            reason = (
                f"needs {format_bytes(needed[position])} for {what}, has "
                f"{format_bytes(candidate.available_bytes)} available (short by {format_bytes(shortfall)})"
            )
            reasons.append(f"{candidate.node_id}: {reason}")
        else:
            reason = f"fits {what}"
        verdicts.append(
            NodeVerdict(candidate.node_id, candidate.available_bytes, needed[position], shortfall, reason)
        )
    return PlacementRefusal(reasons=reasons, nodes=verdicts)


def _fixed_bytes(footprint: ModelFootprint, position: int, last: int) -> int:
    return (footprint.embedding_bytes if position == 0 else 0) + (
        footprint.head_bytes if position == last else 0
    )


def _move_layers_to_fit(counts: list[int], layer_room: list[int], layer_bytes: int) -> list[int]:
    """Rounding can push a node one layer past its room: hand such layers to nodes with space for them.

    Every move lowers the total overflow and never creates a new one, so this ends.
    """
    counts = list(counts)
    while True:
        overflow = [counts[position] * layer_bytes - layer_room[position] for position in range(len(counts))]
        spare = [-amount for amount in overflow]
        donors = [
            position for position in range(len(counts)) if overflow[position] > 0 and counts[position] > 1
        ]
        takers = [position for position in range(len(counts)) if spare[position] >= layer_bytes]
        if not donors or not takers or layer_bytes == 0:
            return counts
        donor = max(donors, key=lambda position: (overflow[position], -position))
        taker = max(takers, key=lambda position: (spare[position], -position))
        counts[donor] -= 1
        counts[taker] += 1


def _layer_ranges(counts: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    start = 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def _stage_description(layer_range: tuple[int, int], position: int, last: int) -> str:
    start, end = layer_range
    parts = [f"layers {start}-{end - 1}" if end - start > 1 else f"layer {start}"]
    if position == 0:
        parts.append("embedding")
    if position == last:
        parts.append("head")
    return " + ".join(parts)


def _unused(candidate: _Candidate, why: str) -> NodeVerdict:
    return NodeVerdict(candidate.node_id, candidate.available_bytes, 0, 0, why)


def _left_out_reasons(left_out: list[NodeVerdict]) -> list[str]:
    return [f"{verdict.node_id}: left out ({verdict.reason})" for verdict in left_out]
