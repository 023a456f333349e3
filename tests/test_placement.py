"""Placement: which nodes hold which layers, and why a model does not fit."""

from __future__ import annotations

import itertools
import random

import pytest

from exo.core.events import ShardAssignment
from exo.core.models import ModelFootprint, ModelInfo
from exo.core.placement import Placement, PlacementRefusal
from exo.core.state import NodeInfo, NodeStatus
from exo.roles.placement import place, previews, split_layers

GIB = 1024**3


def node(node_id: str, available: int, status: NodeStatus = "alive") -> NodeInfo:
    return NodeInfo(
        node_id=node_id, status=status, memory_total_bytes=available * 2, memory_available_bytes=available
    )


def layers_by_node(result: Placement | PlacementRefusal) -> dict[str, tuple[int, int]]:
    assert isinstance(result, Placement), result
    return {node_id: (a.start_layer, a.end_layer) for node_id, a in result.shard_assignments.items()}


@pytest.mark.parametrize(
    ("n_layers", "weights", "expected"),
    [
        (12, [1, 1, 2], [3, 3, 6]),
        (12, [25, 25, 50], [3, 3, 6]),
        (10, [1, 1, 1], [4, 3, 3]),  # one leftover layer: the tie goes to the first node
        (7, [5, 3], [4, 3]),  # quotas 4.375 / 2.625: the larger remainder wins the leftover layer
        (4, [1000, 1, 1], [2, 1, 1]),  # tiny shares still get one layer
        (3, [0, 0, 0], [1, 1, 1]),
        (5, [-3, 10], [1, 4]),
        (1, [7], [1]),
    ],
)
def test_split_layers_largest_remainder(n_layers: int, weights: list[int], expected: list[int]) -> None:
    counts = split_layers(n_layers, weights)
    assert counts == expected
    assert sum(counts) == n_layers


@pytest.mark.parametrize(("n_layers", "n_weights"), [(2, 3), (5, 0)])
def test_split_layers_rejects_impossible_splits(n_layers: int, n_weights: int) -> None:
    with pytest.raises(ValueError, match="cannot split"):
        split_layers(n_layers, [1] * n_weights)


def test_twelve_layers_split_a_quarter_a_quarter_a_half() -> None:
    footprint = ModelFootprint.uniform(n_layers=12, layer_bytes=GIB)
    nodes = [node("a", 4 * GIB), node("b", 4 * GIB), node("c", 8 * GIB)]
    result = place(footprint, nodes, min_nodes=3)
    # Most memory first is the first stage; equal memory ties break by node id.
    assert layers_by_node(result) == {"c": (0, 6), "a": (6, 9), "b": (9, 12)}
    assert isinstance(result, Placement)
    assert result.bytes_by_node == {"c": 6 * GIB, "a": 3 * GIB, "b": 3 * GIB}
    assert result.node_ids == ["c", "a", "b"]
    assert all(a.n_layers == 12 for a in result.shard_assignments.values())


def test_model_that_fits_on_one_node_stays_on_one_node() -> None:
    footprint = ModelFootprint.uniform(n_layers=8, layer_bytes=GIB, embedding_bytes=GIB, head_bytes=GIB)
    nodes = [node("a", 16 * GIB), node("b", 64 * GIB), node("c", 64 * GIB)]
    result = place(footprint, nodes)
    assert layers_by_node(result) == {"b": (0, 8)}
    assert isinstance(result, Placement)
    assert result.bytes_by_node == {"b": 10 * GIB}


def test_fewest_nodes_that_fit() -> None:
    footprint = ModelFootprint.uniform(n_layers=10, layer_bytes=GIB)
    nodes = [node("a", 6 * GIB), node("b", 6 * GIB), node("c", 6 * GIB)]
    assert layers_by_node(place(footprint, nodes)) == {"a": (0, 5), "b": (5, 10)}


def test_min_nodes_spreads_a_model_that_would_fit_on_one() -> None:
    footprint = ModelFootprint.uniform(n_layers=8, layer_bytes=GIB)
    nodes = [node("a", 100 * GIB), node("b", 100 * GIB)]
    assert layers_by_node(place(footprint, nodes, min_nodes=2)) == {"a": (0, 4), "b": (4, 8)}


def test_refusal_names_embedding_and_head_where_they_are() -> None:
    footprint = ModelFootprint.uniform(n_layers=4, layer_bytes=GIB, embedding_bytes=GIB, head_bytes=GIB)
    result = place(footprint, [node("a", GIB), node("b", GIB)])
    assert isinstance(result, PlacementRefusal)
    assert "a: needs 3.00 GiB for layers 0-1 + embedding, has 1.00 GiB available" in result.reasons[1]
    assert "b: needs 3.00 GiB for layers 2-3 + head, has 1.00 GiB available" in result.reasons[2]
    alone = place(footprint, [node("a", GIB)])
    assert isinstance(alone, PlacementRefusal)
    assert "a: needs 6.00 GiB for layers 0-3 + embedding + head" in alone.reasons[1]


def test_embedding_and_head_are_counted_on_first_and_last_stage() -> None:
    # 4 layers of 1 GiB, a 2 GiB embedding and a 2 GiB head: room for layers is 3 GiB on the
    # first node and 2 GiB on the last, so the split is 2.4/1.6 -> 2/2.
    footprint = ModelFootprint.uniform(
        n_layers=4, layer_bytes=GIB, embedding_bytes=2 * GIB, head_bytes=2 * GIB
    )
    nodes = [node("a", 5 * GIB), node("b", 4 * GIB)]
    result = place(footprint, nodes)
    assert isinstance(result, Placement)
    assert layers_by_node(result) == {"a": (0, 2), "b": (2, 4)}
    assert result.bytes_by_node == {"a": 4 * GIB, "b": 4 * GIB}


def test_tied_embeddings_are_needed_on_the_last_stage_too() -> None:
    footprint = ModelFootprint([GIB] * 4, embedding_bytes=GIB, tied_embeddings=True)
    assert footprint.stage_bytes(0, 4) == 5 * GIB  # one node: the matrix once
    assert footprint.stage_bytes(0, 2) == 3 * GIB
    assert footprint.stage_bytes(2, 4) == 3 * GIB  # the output head is the embedding matrix
    result = place(footprint, [node("a", 3 * GIB), node("b", 3 * GIB)])
    assert layers_by_node(result) == {"a": (0, 2), "b": (2, 4)}


def test_unequal_layers_are_summed_per_stage() -> None:
    footprint = ModelFootprint([1, 1, 1, 1, 10, 10], embedding_bytes=0, head_bytes=0)
    result = place(footprint, [node("a", 20), node("b", 20)])
    assert isinstance(result, Placement)
    assert sum(result.bytes_by_node.values()) == 24
    assert all(used <= 20 for used in result.bytes_by_node.values())


def test_footprint_of_a_listed_model() -> None:
    model = ModelInfo(
        model_id="m",
        path="/models/m",
        architecture="llama",
        n_layers=2,
        hidden_size=8,
        vocab_size=10,
        dtype="float16",
        total_weight_bytes=0,
        layer_bytes=[100, 120],
        embedding_bytes=50,
        head_bytes=0,
        other_bytes=4,
        tied_embeddings=True,
        supported=True,
        reason="",
    )
    footprint = ModelFootprint.of_model(model)
    assert footprint == ModelFootprint(
        [100, 120], embedding_bytes=50, head_bytes=4, tied_embeddings=True, weights="native"
    )
    for start, end in [(0, 1), (1, 2), (0, 2)]:
        assert footprint.stage_bytes(start, end) == model.shard_weight_bytes(start, end)


def test_rounding_overflow_is_moved_to_a_node_with_room() -> None:
    # Quotas 2.5/2.5: largest remainder gives the first node 3 layers, which it cannot hold.
    footprint = ModelFootprint.uniform(n_layers=5, layer_bytes=10)
    nodes = [node("a", 25), node("b", 30)]
    result = place(footprint, nodes)
    assert isinstance(result, Placement)
    assert result.bytes_by_node == {"b": 30, "a": 20}


def test_too_little_memory_lists_each_nodes_shortfall() -> None:
    footprint = ModelFootprint.uniform(n_layers=12, layer_bytes=GIB)
    nodes = [node("a", 2 * GIB), node("b", 3 * GIB), node("gone-node", 100 * GIB, status="gone")]
    result = place(footprint, nodes)
    assert isinstance(result, PlacementRefusal)
    verdicts = {verdict.node_id: verdict for verdict in result.nodes}
    assert verdicts["b"].needed_bytes == 7 * GIB
    assert verdicts["b"].shortfall_bytes == 4 * GIB
    assert verdicts["a"].needed_bytes == 5 * GIB
    assert verdicts["a"].shortfall_bytes == 3 * GIB
    assert verdicts["gone-node"].reason == "node is gone"
    text = "\n".join(result.reasons)
    assert "12.00 GiB" in text  # the summary: what the model needs in all
    assert "b: needs 7.00 GiB for layers 0-6, has 3.00 GiB available (short by 4.00 GiB)" in text
    assert "a: needs 5.00 GiB for layers 7-11, has 2.00 GiB available (short by 3.00 GiB)" in text
    assert "gone-node: left out (node is gone)" in text


def test_min_nodes_above_alive_nodes_is_refused() -> None:
    footprint = ModelFootprint.uniform(n_layers=12, layer_bytes=1)
    nodes = [node("a", GIB), node("b", GIB), node("c", GIB, status="gone")]
    result = place(footprint, nodes, min_nodes=3)
    assert isinstance(result, PlacementRefusal)
    assert result.reasons[0] == "min_nodes=3 but only 2 node(s) alive"
    assert {verdict.node_id for verdict in result.nodes} == {"a", "b", "c"}


@pytest.mark.parametrize(
    ("footprint", "min_nodes", "reason"),
    [
        (ModelFootprint.uniform(n_layers=2, layer_bytes=1), 3, "min_nodes=3 exceeds the model's 2 layer(s)"),
        (ModelFootprint.uniform(n_layers=2, layer_bytes=1), 0, "min_nodes must be at least 1, got 0"),
        (ModelFootprint.uniform(n_layers=0, layer_bytes=1), 1, "model has 0 layers; it needs at least 1"),
        (ModelFootprint.uniform(n_layers=2, layer_bytes=-1), 1, "model byte counts must not be negative"),
        (ModelFootprint([5, 5], head_bytes=-1), 1, "model byte counts must not be negative"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(
    footprint: ModelFootprint, min_nodes: int, reason: str
) -> None:
    nodes = [node(f"n{i}", GIB) for i in range(4)]
    result = place(footprint, nodes, min_nodes=min_nodes)
    assert isinstance(result, PlacementRefusal)
    assert result.reasons[0] == reason


def test_no_nodes_at_all() -> None:
    result = place(ModelFootprint.uniform(n_layers=2, layer_bytes=1), [])
    assert isinstance(result, PlacementRefusal)
    assert result.reasons == ["min_nodes=1 but only 0 node(s) alive"]


def test_gone_nodes_are_never_used() -> None:
    footprint = ModelFootprint.uniform(n_layers=4, layer_bytes=GIB)
    nodes = [node("big-but-gone", 1000 * GIB, status="gone"), node("a", 3 * GIB), node("b", 3 * GIB)]
    assert layers_by_node(place(footprint, nodes)) == {"a": (0, 2), "b": (2, 4)}


def test_reserved_memory_is_subtracted() -> None:
    footprint = ModelFootprint.uniform(n_layers=4, layer_bytes=GIB)
    nodes = [node("a", 5 * GIB), node("b", 4 * GIB)]
    assert layers_by_node(place(footprint, nodes)) == {"a": (0, 4)}
    result = place(footprint, nodes, reserved_bytes_by_node={"a": 3 * GIB})
    assert layers_by_node(result) == {"b": (0, 4)}


def test_placement_is_deterministic_whatever_the_input_order() -> None:
    footprint = ModelFootprint.uniform(
        n_layers=31, layer_bytes=GIB, embedding_bytes=GIB // 2, head_bytes=GIB // 3
    )
    nodes = [node(f"node-{i}", (i % 3 + 2) * 4 * GIB) for i in range(6)]
    expected = place(footprint, nodes, min_nodes=4)
    assert isinstance(expected, Placement)
    shuffler = random.Random(7)
    for _ in range(20):
        shuffled = list(nodes)
        shuffler.shuffle(shuffled)
        assert place(footprint, shuffled, min_nodes=4) == expected


@pytest.mark.parametrize("seed", range(30))
def test_placements_are_contiguous_and_fit(seed: int) -> None:
    rng = random.Random(seed)
    n_layers = rng.randint(1, 80)
    footprint = ModelFootprint(
        layer_bytes=[rng.randint(1, 1000) for _ in range(n_layers)],
        embedding_bytes=rng.randint(0, 5000),
        head_bytes=rng.randint(0, 5000),
        tied_embeddings=rng.random() < 0.5,
    )
    nodes = [node(f"n{i}", rng.randint(0, 40_000)) for i in range(rng.randint(1, 6))]
    result = place(footprint, nodes, min_nodes=rng.randint(1, 3))
    if isinstance(result, PlacementRefusal):
        assert result.reasons
        return
    assignments = list(result.shard_assignments.values())
    assert assignments[0].start_layer == 0
    assert assignments[-1].end_layer == footprint.n_layers
    for before, after in itertools.pairwise(assignments):
        assert before.end_layer == after.start_layer
    assert all(a.end_layer > a.start_layer for a in assignments)
    available = {n.node_id: n.memory_available_bytes for n in nodes}
    assert all(used <= available[node_id] for node_id, used in result.bytes_by_node.items())
    for node_id, assignment in result.shard_assignments.items():
        assert result.bytes_by_node[node_id] == footprint.stage_bytes(
            assignment.start_layer, assignment.end_layer
        )
    tied_copy = footprint.embedding_bytes if footprint.tied_embeddings and len(assignments) > 1 else 0
    assert sum(result.bytes_by_node.values()) == footprint.total_bytes + tied_copy


def test_previews_cover_every_node_count() -> None:
    footprint = ModelFootprint.uniform(n_layers=12, layer_bytes=GIB)
    nodes = [node("a", 4 * GIB), node("b", 4 * GIB), node("c", 8 * GIB), node("d", GIB, status="gone")]
    result = previews(footprint, nodes)
    assert [preview.n_nodes for preview in result] == [1, 2, 3]
    one, two, three = result
    assert one.placement is None
    assert one.refusal is not None
    assert "c: needs 12.00 GiB for layers 0-11, has 8.00 GiB available" in one.refusal.reasons[0]
    assert "d: left out (node is gone)" in one.refusal.reasons
    assert two.placement is not None  # c and a hold exactly 12 GiB between them
    assert two.placement.bytes_by_node == {"c": 8 * GIB, "a": 4 * GIB}
    assert two.refusal is None
    assert three.placement is not None
    assert three.placement.shard_assignments == {
        "c": ShardAssignment(0, 6, 12),
        "a": ShardAssignment(6, 9, 12),
        "b": ShardAssignment(9, 12, 12),
    }
    assert three.refusal is None


def test_previews_with_more_nodes_than_layers() -> None:
    result = previews(ModelFootprint.uniform(n_layers=1, layer_bytes=1), [node("a", GIB), node("b", GIB)])
    assert result[0].placement is not None
    assert result[1].refusal is not None
    assert result[1].refusal.reasons == ["1 layer(s) cannot be split over 2 nodes"]


def _fits_some_contiguous_split(footprint: ModelFootprint, available: list[int]) -> bool:
    n_layers, count = footprint.n_layers, len(available)
    for cuts in itertools.combinations(range(1, n_layers), count - 1):
        bounds = [0, *cuts, n_layers]
        if all(footprint.stage_bytes(bounds[i], bounds[i + 1]) <= available[i] for i in range(count)):
            return True
    return False


@pytest.mark.parametrize("seed", range(10))
def test_placement_is_found_whenever_one_exists(seed: int) -> None:
    """Against brute force over every contiguous split of the most-memory-first nodes."""
    rng = random.Random(seed)
    for _ in range(60):
        n_layers = rng.randint(1, 8)
        equal = rng.random() < 0.5
        layer_bytes = (
            [rng.randint(1, 100)] * n_layers if equal else [rng.randint(1, 100) for _ in range(n_layers)]
        )
        footprint = ModelFootprint(layer_bytes, rng.randint(0, 100), rng.randint(0, 100), rng.random() < 0.3)
        nodes = [node(f"n{i}", rng.randint(0, 400)) for i in range(rng.randint(1, 4))]
        ordered = sorted(nodes, key=lambda n: (-n.memory_available_bytes, n.node_id))
        available = [n.memory_available_bytes for n in ordered]
        exists = any(
            _fits_some_contiguous_split(footprint, available[:count])
            for count in range(1, min(len(nodes), n_layers) + 1)
        )
        assert isinstance(place(footprint, nodes), Placement) == exists, (footprint, nodes)
