"""Where an instance's pipeline stages go: pure functions, no I/O, no clock.

A model is its transformer layers (bytes per layer), plus the embedding (first stage only) and the
output head (last stage only). `place` picks the fewest alive nodes (at least `min_nodes`)
whose memory holds the model, most available memory first, and splits the layers between them in
proportion to the memory each has left for layers, by the largest remainder method (every node gets
at least one layer). Pipeline order is the order the nodes were picked in.

Everything is integer arithmetic and every tie breaks on node id, so the same inputs give the same
placement on every node (a new master re-placing after failover agrees with the old one).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping

import msgspec

from exo.core.events import ShardAssignment
from exo.core.models import ModelFootprint
from exo.core.placement import NodeVerdict, Placement, PlacementPreview, PlacementRefusal
from exo.core.state import NodeInfo


class Candidate(msgspec.Struct, frozen=True):
    node_id: str
    available_bytes: int


def place(
    footprint: ModelFootprint,
    nodes: Iterable[NodeInfo],
    min_nodes: int = 1,
    reserved_bytes_by_node: Mapping[str, int] | None = None,
) -> Placement | PlacementRefusal:
    """The placement on the fewest nodes (at least `min_nodes`) that fits, or why none does; with a
    `fallback` footprint (`--weights-dtype auto`), the native representation when float32 does not fit.

    `reserved_bytes_by_node` is memory already promised to instances whose runners have not loaded
    yet (so not visible in the nodes' measured available memory); it is subtracted first.
    """
    return with_fallback(_place_one, footprint, nodes, min_nodes, reserved_bytes_by_node)


PlaceOne = Callable[
    [ModelFootprint, Iterable[NodeInfo], int, Mapping[str, int] | None], Placement | PlacementRefusal
]


def with_fallback(
    place_one: PlaceOne,
    footprint: ModelFootprint,
    nodes: Iterable[NodeInfo],
    min_nodes: int,
    reserved_bytes_by_node: Mapping[str, int] | None,
) -> Placement | PlacementRefusal:
    """`place_one` for the footprint; with a `fallback` footprint (`--weights-dtype auto`) and no
    fit, for the native representation too (pipeline and tensor placement alike)."""
    nodes = list(nodes)
    attempt = place_one(footprint, nodes, min_nodes, reserved_bytes_by_node)
    if isinstance(attempt, Placement) or footprint.fallback is None:
        return attempt
    return fall_back(
        footprint, attempt, place_one(footprint.fallback, nodes, min_nodes, reserved_bytes_by_node)
    )


def fall_back(
    footprint: ModelFootprint, refused: PlacementRefusal, fallback: Placement | PlacementRefusal
) -> Placement | PlacementRefusal:
    """The native placement, saying why, or both refusals' reasons when neither fits."""
    assert footprint.fallback is not None
    sizes = (
        f"held as float32 the model needs {format_bytes(footprint.total_bytes)}, as the checkpoint "
        f"has it {format_bytes(footprint.fallback.total_bytes)}"
    )
    if isinstance(fallback, Placement):
        why = "; ".join(refused.reasons[:1]) or "it does not fit"
        note = f"kept the checkpoint's representation: {sizes}; too little memory for float32 ({why})"
        return msgspec.structs.replace(fallback, weights="native", weights_note=note)
    return PlacementRefusal(reasons=[sizes, *fallback.reasons], nodes=fallback.nodes)


def _place_one(
    footprint: ModelFootprint,
    nodes: Iterable[NodeInfo],
    min_nodes: int = 1,
    reserved_bytes_by_node: Mapping[str, int] | None = None,
) -> Placement | PlacementRefusal:
    problem = _check_footprint(footprint)
    if problem is not None:
        return PlacementRefusal(reasons=[problem], nodes=[])
    if min_nodes < 1:
        return PlacementRefusal(reasons=[f"min_nodes must be at least 1, got {min_nodes}"], nodes=[])
    candidates, left_out = candidates_of(nodes, reserved_bytes_by_node or {})
    if min_nodes > len(candidates):
        reason = f"min_nodes={min_nodes} but only {len(candidates)} node(s) alive"
        verdicts = [
            *left_out,
            *(_unused(candidate, "alive but too few alive nodes") for candidate in candidates),
        ]
        return PlacementRefusal(reasons=[reason, *left_out_reasons(left_out)], nodes=verdicts)
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
        reasons=[summary, *refusal.reasons, *left_out_reasons(left_out)],
        nodes=[*refusal.nodes, *unused, *left_out],
    )


def previews(
    footprint: ModelFootprint,
    nodes: Iterable[NodeInfo],
    reserved_bytes_by_node: Mapping[str, int] | None = None,
) -> list[PlacementPreview]:
    """A placement (or the reasons against one) for each node count from 1 to the number of alive nodes."""
    nodes = list(nodes)
    candidates, left_out = candidates_of(nodes, reserved_bytes_by_node or {})
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
            if isinstance(attempt, PlacementRefusal) and footprint.fallback is not None:
                native = _place_on(footprint.fallback, candidates[:node_count])
                attempt = fall_back(footprint, attempt, native)
        if isinstance(attempt, Placement):
            result.append(PlacementPreview(n_nodes=node_count, placement=attempt, refusal=None))
        else:
            refusal = PlacementRefusal(
                reasons=[*attempt.reasons, *left_out_reasons(left_out)], nodes=[*attempt.nodes, *left_out]
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
    if min([*footprint.layer_bytes, footprint.embedding_bytes, footprint.head_bytes]) < 0:
        return "model byte counts must not be negative"
    return None


def candidates_of(
    nodes: Iterable[NodeInfo], reserved_bytes_by_node: Mapping[str, int]
) -> tuple[list[Candidate], list[NodeVerdict]]:
    """Alive nodes, most available memory first (ties by node id), and verdicts for the rest."""
    candidates: list[Candidate] = []
    left_out: list[NodeVerdict] = []
    for node in sorted(nodes, key=lambda node: node.node_id):
        available = node.memory_available_bytes - reserved_bytes_by_node.get(node.node_id, 0)
        if node.status != "alive":
            left_out.append(NodeVerdict(node.node_id, max(0, available), 0, 0, f"node is {node.status}"))
        else:
            candidates.append(Candidate(node.node_id, max(0, available)))
    candidates.sort(key=lambda candidate: (-candidate.available_bytes, candidate.node_id))
    return candidates, left_out


def _place_on(footprint: ModelFootprint, chosen: list[Candidate]) -> Placement | PlacementRefusal:
    """Split the model over exactly these nodes, in this pipeline order, and check that it fits."""
    last = len(chosen) - 1
    available = [candidate.available_bytes for candidate in chosen]
    layer_room = [
        available[position] - _fixed_bytes(footprint, position, last) for position in range(len(chosen))
    ]
    counts = split_layers(footprint.n_layers, layer_room)
    counts = _move_layers_to_fit(footprint, counts, available)
    ranges = _layer_ranges(counts)
    needed = [footprint.stage_bytes(start, end) for start, end in ranges]
    fits = all(needed[position] <= available[position] for position in range(len(chosen)))
    if not fits:
        # Unequal layers can defeat the proportional split where some other split fits.
        fitting_counts = _any_fitting_counts(footprint, available)
        if fitting_counts is not None:
            ranges = _layer_ranges(fitting_counts)
            needed = [footprint.stage_bytes(start, end) for start, end in ranges]
            fits = True
    if fits:
        return Placement(
            shard_assignments={
                candidate.node_id: ShardAssignment(start, end, footprint.n_layers)
                for candidate, (start, end) in zip(chosen, ranges, strict=True)
            },
            bytes_by_node={candidate.node_id: needed[position] for position, candidate in enumerate(chosen)},
            weights=footprint.weights,
        )
    verdicts: list[NodeVerdict] = []
    reasons: list[str] = []
    for position, candidate in enumerate(chosen):
        shortfall = max(0, needed[position] - available[position])
        what = _stage_description(footprint, ranges[position], position, last)
        if shortfall:
            reason = (
                f"needs {format_bytes(needed[position])} for {what}, has "
                f"{format_bytes(available[position])} available (short by {format_bytes(shortfall)})"
            )
            reasons.append(f"{candidate.node_id}: {reason}")
        else:
            reason = f"fits {what}"
        verdicts.append(
            NodeVerdict(candidate.node_id, available[position], needed[position], shortfall, reason)
        )
    return PlacementRefusal(reasons=reasons, nodes=verdicts)


def _fixed_bytes(footprint: ModelFootprint, position: int, last: int) -> int:
    return footprint.fixed_bytes(first=position == 0, last=position == last)


def _move_layers_to_fit(footprint: ModelFootprint, counts: list[int], available: list[int]) -> list[int]:
    """Rounding can push a node a layer past its memory: hand such layers to nodes with room for one.

    With equal layers every move lowers the total overflow; with unequal ones a move also shifts
    the nodes in between by a layer, so the number of moves is bounded instead.
    """
    counts = list(counts)
    largest_layer = max(footprint.layer_bytes)
    for _ in range(footprint.n_layers * len(counts)):
        needed = [footprint.stage_bytes(start, end) for start, end in _layer_ranges(counts)]
        overflow = [needed[position] - available[position] for position in range(len(counts))]
        donors = [
            position for position in range(len(counts)) if overflow[position] > 0 and counts[position] > 1
        ]
        takers = [position for position in range(len(counts)) if -overflow[position] >= largest_layer]
        if not donors or not takers or largest_layer == 0:
            break
        donor = max(donors, key=lambda position: (overflow[position], -position))
        taker = max(takers, key=lambda position: (-overflow[position], -position))
        counts[donor] -= 1
        counts[taker] += 1
    return counts


def _any_fitting_counts(footprint: ModelFootprint, available: list[int]) -> list[int] | None:
    """Layer counts that fit these nodes in this order, if any do: each stage takes as many layers
    as it can while the stages after it can still hold the rest. Exact, O(nodes x layers^2)."""
    n_layers, last = footprint.n_layers, len(available) - 1
    if sum(available) < footprint.total_bytes:
        return None
    prefix = [0, *itertools.accumulate(footprint.layer_bytes)]

    def stage_fits(position: int, start: int, end: int) -> bool:
        fixed = _fixed_bytes(footprint, position, last)
        return prefix[end] - prefix[start] + fixed <= available[position]

    # holdable[position][start]: stages position.. can hold layers [start, n_layers).
    holdable = [[False] * (n_layers + 1) for _ in range(len(available) + 1)]
    holdable[len(available)][n_layers] = True
    for position in range(last, -1, -1):
        for start in range(n_layers):
            end = start + 1
            while end <= n_layers and stage_fits(position, start, end):
                if holdable[position + 1][end]:
                    holdable[position][start] = True
                    break
                end += 1
    if not holdable[0][0]:
        return None
    counts: list[int] = []
    start = 0
    for position in range(len(available)):
        end = max(
            end
            for end in range(start + 1, n_layers + 1)
            if stage_fits(position, start, end) and holdable[position + 1][end]
        )
        counts.append(end - start)
        start = end
    return counts


def _layer_ranges(counts: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    start = 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def _stage_description(
    footprint: ModelFootprint, layer_range: tuple[int, int], position: int, last: int
) -> str:
    start, end = layer_range
    parts = [f"layers {start}-{end - 1}" if end - start > 1 else f"layer {start}"]
    if position == 0 and footprint.embedding_bytes:
        parts.append("embedding")
    if position == last and footprint.fixed_bytes(first=position == 0, last=True) > (
        footprint.embedding_bytes if position == 0 else 0
    ):
        parts.append("head")
    return " + ".join(parts)


def _unused(candidate: Candidate, why: str) -> NodeVerdict:
    return NodeVerdict(candidate.node_id, candidate.available_bytes, 0, 0, why)


def left_out_reasons(left_out: list[NodeVerdict]) -> list[str]:
    return [f"{verdict.node_id}: left out ({verdict.reason})" for verdict in left_out]
