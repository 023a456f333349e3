"""Checkpoints as users download them (bfloat16, mlx-lm 4-bit and 8-bit) held as float32 on the CPU.

Exactness: a float32-upcast pipeline (1, 2 and 3 stages) gives mlx-lm's greedy tokens and logits,
bit for bit, when mlx-lm runs the same weights upcast to float32. A dequantized pipeline matches
mlx-lm's quantized model (scales widened to float32, so both compute in float32): greedy tokens
equal over GREEDY_TOKENS steps for each of PROMPTS, logits within LOGITS_TOLERANCE of the largest
logit (measured: identical on x86_64 with MKL, where MLX's float32 quantized_matmul dequantizes and
multiplies the same way; the tolerance leaves room for another summation order elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from exo.inference.models import get_model
from exo.inference.protocol import RunnerFailed, ShardLoaded
from exo.inference.runner_options import parse_arguments as parse_runner_arguments
from exo.inference.runner_options import runner_command
from exo.inference.shard import ShardSpec, load_shard
from exo.inference.synthetic import SyntheticModelSpec, parse_arguments, write_synthetic_model
from exo.inference.weights import wanted_representation
from tests.harness.greedy_checks import (
    LOGITS_TOLERANCE,
    PROMPTS,
    assert_greedy_matches,
    module_class,
    pipeline_greedy,
    reference_greedy,
    stages_of,
    upcast_reference,
)
from tests.harness.inference_helpers import (
    N_LAYERS,
    ControlServer,
    control_server,  # noqa: F401 (a fixture)
    load,
    spawn_runner,
    stop_runners,
    tiny_format_models,
)

# --- synthetic models in every format -----------------------------------------------------------


def test_synthetic_formats_are_what_mlx_lm_writes() -> None:
    models = tiny_format_models()
    bf16 = get_model(models["bf16"].parent, models["bf16"].name)
    assert bf16.dtype == "bfloat16" and bf16.supported
    q4_config = json.loads((models["q4"] / "config.json").read_text())
    assert q4_config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    q4 = get_model(models["q4"].parent, models["q4"].name)
    assert q4.supported and q4.dtype == "uint32"
    # scales, biases and norms in bfloat16, as Hub conversions have them
    assert get_header_dtype(models["q4"], "model.layers.0.mlp.up_proj.scales") == "BF16"
    assert get_header_dtype(models["q4"], "model.norm.weight") == "BF16"
    assert get_header_dtype(models["q8"], "model.layers.0.mlp.up_proj.scales") == "F32"
    q8_config = json.loads((models["q8"] / "config.json").read_text())
    assert q8_config["quantization"]["bits"] == 8 and q8_config["quantization"]["group_size"] == 32


def get_header_dtype(model: Path, tensor: str) -> str:
    from exo.inference.models import read_safetensors_header

    return str(read_safetensors_header(model / "model.safetensors")[tensor]["dtype"])


def test_synthetic_format_arguments_are_checked(tmp_path: Path) -> None:
    _, spec, _shards = parse_arguments(
        [str(tmp_path / "m"), "--dtype", "float16", "--quantize", "8", "--group-size", "32"]
    )
    assert (spec.dtype, spec.quantize_bits, spec.group_size) == ("float16", 8, 32)
    for bad in (
        ["--dtype", "int8"],
        ["--quantize", "7"],
        ["--group-size", "48"],
        ["--dtype", "bfloat16", "--shards", "2"],
    ):
        with pytest.raises(SystemExit):
            parse_arguments([str(tmp_path / "m"), *bad])
    with pytest.raises(ValueError, match="multiples of the group size"):
        write_synthetic_model(
            tmp_path / "odd", SyntheticModelSpec(hidden=96, heads=4, quantize_bits=4, group_size=64)
        )
    assert not (tmp_path / "odd").exists()


def test_float16_synthetic_model_loads_as_float32(tmp_path: Path) -> None:
    spec = SyntheticModelSpec(layers=2, hidden=64, intermediate=128, vocab=300, dtype="float16")
    model = write_synthetic_model(tmp_path / "f16", spec)
    assert get_model(tmp_path, "f16").dtype == "float16"
    native = load_shard(model, ShardSpec(start_layer=0, end_layer=2, n_layers=2), "native")
    widened = load_shard(model, ShardSpec(start_layer=0, end_layer=2, n_layers=2), "float32")
    assert widened.weight_bytes == 2 * native.weight_bytes
    assert widened.representation == "float32" and native.representation == "native"
    tokens = mx.array([[3, 4, 5]])
    assert widened.forward(tokens, widened.make_cache()).dtype == mx.float32
    assert native.forward(tokens, native.make_cache()).dtype == mx.float16


# --- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_upcast_bfloat16_pipeline_equals_mlx_lm_on_upcast_weights(
    stages: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bit for bit with MLX's matmul (the kernel's float32 product sums in another order, within
    # a tolerance: tests/test_qkernel_float.py).
    monkeypatch.setenv("EXO_KERNEL_FLOAT", "off")
    model = tiny_format_models()["bf16"]
    reference = upcast_reference(model)
    shards = stages_of(model, stages)
    assert all(shard.representation == "float32" for shard in shards)
    for prompt in PROMPTS:
        expected_tokens, expected_logits = reference_greedy(reference, prompt)
        tokens, logits = pipeline_greedy(shards, prompt)
        assert len(set(expected_tokens)) > 3, "greedy output should vary for the test to mean much"
        assert tokens == expected_tokens
        assert all(mx.array_equal(a, b).item() for a, b in zip(logits, expected_logits, strict=True))


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("checkpoint", ["q4", "q8"])
def test_dequantized_pipeline_matches_mlx_lm_quantized_model(
    checkpoint: str, stages: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXO_KERNEL", "off")  # the dequantized path (the kernel's: tests/test_qkernel.py)
    model = tiny_format_models()[checkpoint]
    reference = upcast_reference(model)  # still quantized: only scales, biases and norms widen
    assert module_class(reference, "model.layers.0.mlp.up_proj") == "QuantizedLinear"
    shards = stages_of(model, stages)
    assert module_class(shards[0].layers[0], "mlp.down_proj") == "Linear"
    assert_greedy_matches(shards, lambda prompt: reference_greedy(reference, prompt), LOGITS_TOLERANCE)


def test_dequantized_weights_are_float32_and_six_times_the_packed_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EXO_KERNEL", "off")
    model = tiny_format_models()["q4"]
    native = load_shard(model, ShardSpec(start_layer=1, end_layer=3, n_layers=N_LAYERS), "native")
    widened = load_shard(model, ShardSpec(start_layer=1, end_layer=3, n_layers=N_LAYERS), "float32")
    ratio = widened.weight_bytes / native.weight_bytes
    assert 5.0 < ratio < 7.5, ratio  # 4 bits + a bfloat16 scale and bias per 64 weights -> 32 bits
    from mlx.utils import tree_flatten

    dtypes = {
        array.dtype
        for layer in widened.layers
        for _, array in tree_flatten(layer.parameters())
        if isinstance(array, mx.array)
    }
    assert dtypes == {mx.float32}


# --- the flag -------------------------------------------------------------------------------------


def test_weights_dtype_resolution() -> None:
    assert wanted_representation("auto", accelerator=False) == "float32"
    assert wanted_representation("auto", accelerator=True) == "native"
    assert wanted_representation("auto", placed="native", accelerator=False) == "native"
    assert wanted_representation("float32", placed="native", accelerator=True) == "float32"
    assert wanted_representation("native", accelerator=False) == "native"
    with pytest.raises(ValueError, match="weights dtype must be one of"):
        wanted_representation("bf16")  # type: ignore[arg-type]


def test_runner_flag_round_trips_and_rejects_bad_values() -> None:
    argv = runner_command("tcp://127.0.0.1:1", "r", weights_dtype="native")
    assert argv[argv.index("--weights-dtype") + 1] == "native"
    assert "--weights-dtype" not in runner_command("tcp://127.0.0.1:1", "r")
    assert parse_runner_arguments(["--control", "tcp://x:1"]).weights_dtype == "auto"
    assert (
        parse_runner_arguments(["--control", "tcp://x:1", "--weights-dtype", "float32"]).weights_dtype
        == "float32"
    )
    with pytest.raises(SystemExit):
        parse_runner_arguments(["--control", "tcp://x:1", "--weights-dtype", "int4"])


@pytest.mark.slow
def test_runners_report_the_representation_they_hold(control_server: ControlServer) -> None:  # noqa: F811
    model = tiny_format_models()["bf16"]
    auto, native = spawn_runner(control_server), spawn_runner(control_server, "--weights-dtype", "native")
    placed_native = spawn_runner(control_server)
    try:
        answers = [load(control_server, runner, model, 0, 3) for runner in (auto, native)]
        answers.append(load(control_server, placed_native, model, 0, 3, placed_weights="native"))
        assert all(isinstance(answer, ShardLoaded) for answer in answers), answers
        loaded = [answer for answer in answers if isinstance(answer, ShardLoaded)]
        assert [answer.weights for answer in loaded] == ["float32", "native", "native"]
        assert loaded[0].weight_bytes == 2 * loaded[1].weight_bytes
        assert not any(isinstance(answer, RunnerFailed) for answer in answers)
    finally:
        stop_runners(control_server, [auto, native, placed_native])
