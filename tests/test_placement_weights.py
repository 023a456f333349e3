"""Placement sizes stages by the representation they will hold: float32 after an upcast or a
dequantization on MLX's CPU backend, and falls back to the checkpoint's own when memory is short."""

from __future__ import annotations

import msgspec
import pytest

from exo.core.events import IndexedEvent, InstanceCreated, NodeJoined, ShardAssignment
from exo.core.messages import PlaceInstance
from exo.core.models import ModelFootprint, ModelInfo
from exo.core.placement import Placement, PlacementRefusal
from exo.core.state import NodeInfo, State, apply
from exo.inference.models import get_model
from exo.inference.shard import ShardSpec, load_shard
from exo.roles.commands import decide, reserved_bytes
from exo.roles.placement import place, previews
from exo.roles.worker_plan import StartRunner, plan
from tests.harness.inference_helpers import N_LAYERS, tiny_format_models

MIB = 1024**2


def bf16_model() -> ModelInfo:
    folder = tiny_format_models()["bf16"]
    return get_model(folder.parent, folder.name)


def node(node_id: str, available: int) -> NodeInfo:
    return NodeInfo(
        node_id=node_id, status="alive", memory_total_bytes=available * 2, memory_available_bytes=available
    )


def test_footprint_is_the_bytes_of_the_representation_held() -> None:
    model = bf16_model()
    auto = ModelFootprint.of_model(model, "auto", accelerator=False)
    native = ModelFootprint.of_model(model, "native")
    assert auto.weights == "float32" and native.weights == "native"
    assert auto.total_bytes == 2 * native.total_bytes == 2 * model.total_weight_bytes
    assert auto.fallback == native
    forced = ModelFootprint.of_model(model, "float32", accelerator=True)
    assert forced.weights == "float32" and forced.fallback is None
    assert ModelFootprint.of_model(model, "auto", accelerator=True) == native


@pytest.mark.parametrize("kernel", ["on", "off"])
def test_footprint_of_quantized_checkpoints_equals_what_a_stage_loads(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With exo's CPU kernel (exo.inference.qkernel) quantized linear layers stay packed; without
    # it they are dequantized to float32. Either way placement sizes what the stage loads.
    if kernel == "off":
        monkeypatch.setenv("EXO_KERNEL", "off")
    for name in ("q4", "q8"):
        folder = tiny_format_models()[name]
        model = get_model(folder.parent, folder.name)
        footprint = ModelFootprint.of_model(model, "auto", accelerator=False)
        assert footprint.fallback is not None
        for start, end in [(0, 2), (2, 4), (4, 6), (0, 6)]:
            shard = load_shard(
                folder, ShardSpec(start_layer=start, end_layer=end, n_layers=N_LAYERS), "float32"
            )
            assert footprint.stage_bytes(start, end) == shard.weight_bytes
            native = load_shard(
                folder, ShardSpec(start_layer=start, end_layer=end, n_layers=N_LAYERS), "native"
            )
            assert footprint.fallback.stage_bytes(start, end) == native.weight_bytes
    q4 = get_model(tiny_format_models()["q4"].parent, "tiny-q4")
    assert q4.float32 is not None
    ratio = sum(q4.float32.layer_bytes) / sum(q4.layer_bytes)
    if kernel == "off":
        assert 6.0 < ratio < 7.2, ratio  # 4 bits + bfloat16 scale and bias per 64 weights: 4.5 bits
    else:
        assert 1.0 < ratio < 1.05, ratio  # packed as in the file; only the norms widen


def test_auto_keeps_the_native_representation_when_float32_does_not_fit_and_says_so() -> None:
    model = bf16_model()
    footprint = ModelFootprint.of_model(model, "auto", accelerator=False)
    roomy = place(footprint, [node("a", 64 * MIB)])
    assert isinstance(roomy, Placement) and roomy.weights == "float32" and roomy.weights_note == ""
    assert roomy.bytes_by_node == {"a": footprint.total_bytes}

    between = (footprint.total_bytes + model.total_weight_bytes) // 2
    short = place(footprint, [node("a", between)])
    assert isinstance(short, Placement) and short.weights == "native"
    assert short.bytes_by_node == {"a": model.total_weight_bytes}
    assert "kept the checkpoint's representation" in short.weights_note
    assert "held as float32 the model needs" in short.weights_note

    refused = place(footprint, [node("a", model.total_weight_bytes // 2)])
    assert isinstance(refused, PlacementRefusal)
    assert refused.reasons[0].startswith("held as float32 the model needs")
    assert any("short by" in reason for reason in refused.reasons)

    forced = ModelFootprint.of_model(model, "float32", accelerator=False)
    assert isinstance(place(forced, [node("a", between)]), PlacementRefusal)


def test_previews_fall_back_the_same_way() -> None:
    model = bf16_model()
    footprint = ModelFootprint.of_model(model, "auto", accelerator=False)
    between = (footprint.total_bytes + model.total_weight_bytes) // 2
    one, two = previews(footprint, [node("a", between), node("b", between)])
    assert one.placement is not None and one.placement.weights == "native" and one.placement.weights_note
    assert two.placement is not None and two.placement.weights == "float32" and not two.placement.weights_note
    (tiny,) = previews(footprint, [node("a", 1000)])
    assert tiny.refusal is not None and tiny.refusal.reasons[0].startswith("held as float32")


def state_of(*events: object) -> State:
    state = State()
    for index, event in enumerate(events, start=1):
        state = apply(state, IndexedEvent(index, 1, "m", -1, event))  # type: ignore[arg-type]
    return state


def test_the_instance_records_the_representation_and_its_runner_is_told() -> None:
    model = bf16_model()
    footprint = ModelFootprint.of_model(model, "auto", accelerator=False)
    between = (footprint.total_bytes + model.total_weight_bytes) // 2
    joined = NodeJoined("a", "a:1", 2 * between, between)
    outcome = decide(PlaceInstance("m", footprint), state_of(joined), {"m": {"a"}}, "i-1")
    (created,) = outcome.events
    assert isinstance(created, InstanceCreated) and created.weights == "native" and created.weights_note
    state = state_of(joined, created)
    instance = state.instances["i-1"]
    assert instance.weights == "native" and "kept the checkpoint's representation" in instance.weights_note
    assert msgspec.to_builtins(instance)["weights_note"] == instance.weights_note  # shown by GET /instance
    assert plan(state, "a", {}) == [StartRunner("i-1", "m", ShardAssignment(0, N_LAYERS, N_LAYERS), "native")]
    # memory promised to the loading instance is what it will hold: the native bytes
    assert reserved_bytes(state, {"m": footprint}) == {"a": model.total_weight_bytes}

    roomy = NodeJoined("a", "a:1", 128 * MIB, 64 * MIB)
    created = decide(PlaceInstance("m", footprint), state_of(roomy), {"m": {"a"}}, "i-2").events[0]
    assert isinstance(created, InstanceCreated) and created.weights == "float32" and not created.weights_note
    state = state_of(roomy, created)
    # a float32 choice does not bind the runner: on Metal or CUDA it keeps the native weights
    assert plan(state, "a", {}) == [StartRunner("i-2", "m", ShardAssignment(0, N_LAYERS, N_LAYERS), None)]
    assert reserved_bytes(state, {"m": footprint}) == {"a": footprint.total_bytes}


def test_a_footprint_with_its_fallback_crosses_the_bus() -> None:
    from exo.core.messages import CommandRequested

    footprint = ModelFootprint.of_model(bf16_model(), "auto", accelerator=False)
    message = CommandRequested(PlaceInstance("m", footprint))
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=CommandRequested)
    assert decoded == message


def test_a_nodes_catalog_asks_for_the_footprint_of_its_own_weights_dtype() -> None:
    from exo.node.api_adapter import ModelCatalog

    folder = tiny_format_models()["bf16"]
    model = bf16_model()
    auto = ModelCatalog(folder.parent, "auto").footprint(folder.name)
    native = ModelCatalog(folder.parent, "native").footprint(folder.name)
    assert auto is not None and native is not None
    assert native.weights == "native" and native.total_bytes == model.total_weight_bytes
    # on this machine's CPU backend auto holds float32, with the native bytes to fall back on
    assert auto.weights == "float32" and auto.fallback == native
