"""Tensor placement: every chosen node holds 1/N of every layer, and refusals say why."""

from __future__ import annotations

import importlib

import msgspec
import pytest

from exo.core.events import InstanceCreated, ShardAssignment, decode_event
from exo.core.models import ModelFootprint
from exo.core.placement import Placement, PlacementRefusal
from exo.core.state import NodeInfo
from exo.inference.models import TENSOR_PARALLEL_ARCHITECTURES
from exo.inference.shard import model_classes
from exo.roles.tensor_placement import place_tensor, tensor_previews

MIB = 1024**2


def node(node_id: str, available: int, status: str = "alive") -> NodeInfo:
    return NodeInfo(node_id, status, available * 2, available)  # type: ignore[arg-type]


def footprint(heads: int = 8, kv_heads: int = 4, tensor_parallel: bool = True) -> ModelFootprint:
    # 4 layers of 100 MiB, 50 MiB embedding, 30 MiB head
    return ModelFootprint(
        [100 * MIB] * 4, 50 * MIB, 30 * MIB, False, heads, kv_heads, tensor_parallel=tensor_parallel
    )


def test_two_ranks_each_hold_half_of_every_layer_and_of_the_head_and_the_whole_embedding() -> None:
    result = place_tensor(footprint(), [node("a", 400 * MIB), node("b", 300 * MIB)], min_nodes=2)
    assert isinstance(result, Placement), result
    assert result.shard_assignments == {
        "a": ShardAssignment(0, 4, 4, rank=0, size=2),
        "b": ShardAssignment(0, 4, 4, rank=1, size=2),
    }
    assert result.bytes_by_node == {"a": 265 * MIB, "b": 265 * MIB}  # 400/2 + 50 + 30/2


def test_tied_embeddings_are_the_head_so_each_rank_holds_a_share_of_them() -> None:
    # tied: 50 MiB of embeddings serve as the head; the 6 MiB "head" is the final norm and the rest
    tied = ModelFootprint([100 * MIB] * 4, 50 * MIB, 6 * MIB, True, 8, 4, tensor_parallel=True)
    result = place_tensor(tied, [node("a", GIB), node("b", GIB)], min_nodes=2)
    assert isinstance(result, Placement), result
    assert result.bytes_by_node == {"a": 231 * MIB, "b": 231 * MIB}  # 400/2 + 50/2 + 6
    assert tied.tensor_rank_bytes(3) == -(-400 * MIB // 3) + -(-50 * MIB // 3) + 6 * MIB


def test_fewest_nodes_that_fit_and_rank_zero_has_the_most_memory() -> None:
    result = place_tensor(footprint(), [node("a", 300 * MIB), node("b", 200 * MIB), node("c", 290 * MIB)])
    assert isinstance(result, Placement), result
    assert {n: a.rank for n, a in result.shard_assignments.items()} == {"a": 0, "c": 1}


@pytest.mark.parametrize(
    ("heads", "kv_heads", "expected"),
    [
        (9, 3, "9 attention heads cannot be split evenly over 2 nodes"),
        (8, 1, "1 KV heads cannot be split evenly over 2 nodes"),
    ],
)
def test_heads_that_do_not_divide_are_refused_with_the_reason(
    heads: int, kv_heads: int, expected: str
) -> None:
    result = place_tensor(footprint(heads, kv_heads), [node("a", GIB), node("b", GIB)], min_nodes=2)
    assert isinstance(result, PlacementRefusal)
    assert any(expected in reason for reason in result.reasons), result.reasons


def test_a_node_short_of_memory_is_named_with_its_shortfall() -> None:
    result = place_tensor(footprint(), [node("a", GIB), node("b", 200 * MIB)], min_nodes=2)
    assert isinstance(result, PlacementRefusal)
    assert any(reason.startswith("on 2 node(s): b: needs 265.00 MiB") for reason in result.reasons)
    assert [verdict.shortfall_bytes for verdict in result.nodes if verdict.node_id == "b"] == [65 * MIB]


def test_a_family_without_shard_and_unknown_heads_are_refused() -> None:
    refusal = place_tensor(footprint(tensor_parallel=False), [node("a", GIB)])
    assert isinstance(refusal, PlacementRefusal)
    assert "no tensor-parallel implementation" in refusal.reasons[0]
    refusal = place_tensor(footprint(heads=0, kv_heads=0), [node("a", GIB)])
    assert isinstance(refusal, PlacementRefusal)
    assert "attention heads" in refusal.reasons[0]


def test_too_few_alive_nodes() -> None:
    refusal = place_tensor(footprint(), [node("a", GIB), node("b", GIB, "gone")], min_nodes=2)
    assert isinstance(refusal, PlacementRefusal)
    assert refusal.reasons[0] == "min_nodes=2 but only 1 node(s) alive"


def test_previews_say_tensor_and_explain_each_node_count() -> None:
    result = tensor_previews(footprint(heads=6, kv_heads=6), [node(n, GIB) for n in "abc"])
    assert [(p.n_nodes, p.sharding, p.placement is not None) for p in result] == [
        (1, "Tensor", True),
        (2, "Tensor", True),
        (3, "Tensor", True),
    ]
    result = tensor_previews(footprint(heads=8, kv_heads=4), [node(n, GIB) for n in "abc"])
    assert result[2].refusal is not None
    assert "8 attention heads cannot be split evenly over 3 nodes" in result[2].refusal.reasons


def test_old_logs_decode_as_rank_zero_of_one() -> None:
    old = b'{"type":"InstanceCreated","instance_id":"i","model_id":"m","sharding":"Pipeline",' + (
        b'"shard_assignments":{"n":{"start_layer":0,"end_layer":2,"n_layers":2}}}'
    )
    event = msgspec.json.decode(old, type=InstanceCreated)
    assert event.shard_assignments["n"] == ShardAssignment(0, 2, 2, rank=0, size=1)
    created = InstanceCreated("i", "m", "Tensor", {"n": ShardAssignment(0, 2, 2, 1, 2)})
    assert decode_event(msgspec.msgpack.encode(created)) == created


@pytest.mark.parametrize("architecture", sorted(TENSOR_PARALLEL_ARCHITECTURES))
def test_every_family_said_tensor_parallel_has_shard_in_mlx_lm(architecture: str) -> None:
    model_class, _ = model_classes({"model_type": architecture})
    assert callable(getattr(model_class, "shard", None))
    assert importlib.import_module(model_class.__module__)


GIB = 1024**3


def test_auto_weights_fall_back_to_the_checkpoint_representation_when_float32_does_not_fit() -> None:
    native = msgspec.structs.replace(footprint(), weights="native")
    wide = ModelFootprint(
        [200 * MIB] * 4,
        100 * MIB,
        60 * MIB,
        False,
        8,
        4,
        tensor_parallel=True,
        weights="float32",
        fallback=native,
    )
    roomy = place_tensor(wide, [node("a", GIB), node("b", GIB)], min_nodes=2)
    assert isinstance(roomy, Placement) and roomy.weights == "float32"
    tight = place_tensor(wide, [node("a", 400 * MIB), node("b", 400 * MIB)], min_nodes=2)
    assert isinstance(tight, Placement) and tight.weights == "native"
    assert tight.bytes_by_node == {"a": 265 * MIB, "b": 265 * MIB}
    assert "kept the checkpoint's representation" in tight.weights_note
