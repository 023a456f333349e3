"""A tensor rank's share of the output head (exo.inference.vocab_shard): the slices cover the
vocabulary once, and over a real mx.distributed ring of 2 and 3 ranks the gathered logits are one
process's (tied and untied, float32, widened 4-bit and 8-bit, and a 4-bit head kept packed), while
each rank holds only its rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from exo.inference.shard import ShardSpec, load_shard
from exo.inference.synthetic import write_synthetic_model
from exo.inference.vocab_shard import vocab_rows
from tests.harness.cluster_harness import free_port
from tests.harness.inference_helpers import TINY_SPECS, tiny_format_models, tiny_models

PROMPT = [5, 80, 301, 17, 260, 44, 99, 3, 411, 200]


def test_the_slices_cover_the_vocabulary_once_and_bad_input_is_refused() -> None:
    for vocab, size in ((512, 2), (512, 3), (32000, 3), (7, 4), (1, 1)):
        slices = [vocab_rows(vocab, size, rank) for rank in range(size)]
        covered = [token for start, rows, _ in slices for token in range(start, start + rows)]
        assert covered == list(range(vocab))
        assert {padded for _, _, padded in slices} == {-(-vocab // size)}
    assert vocab_rows(32000, 3, 2) == (21334, 10666, 10667)
    for vocab, size, rank in ((0, 2, 0), (10, 0, 0), (10, 2, 2), (10, 2, -1)):
        with pytest.raises(ValueError, match="no vocabulary slice"):
            vocab_rows(vocab, size, rank)


_RANK = textwrap.dedent(
    """
    import json, sys
    import mlx.core as mx
    from mlx import nn
    from exo.inference.shard import ShardSpec, load_shard
    from exo.inference.vocab_shard import VocabShard
    group = mx.distributed.init(strict=True, backend="ring")
    report = []
    for path, layers, representation in json.loads(sys.argv[1]):
        shard = load_shard(path, ShardSpec(start_layer=0, end_layer=layers, n_layers=layers), representation,
                           group=group)
        logits = shard.forward(mx.array([json.loads(sys.argv[2])]), shard.make_cache())
        held = shard.head.__self__  # the VocabShard whose as_linear is the head
        report.append({
            "logits": logits.astype(mx.float32).tolist(),
            "head": type(held.part).__name__, "rows": held.rows, "held_rows": held.part.weight.shape[0],
            "lookup_sharded": isinstance(shard.embed_tokens, VocabShard),
        })
    # Heads kept quantized (the native representation): the module alone against the whole module.
    mx.random.seed(7)
    vocab = 517  # divides by neither 2 nor 3
    x, ids = mx.random.normal((1, 3, 128)), mx.array([[0, 172, 516, 345]])
    quantized = {}
    for source in (nn.QuantizedLinear(128, vocab, bias=False, group_size=64, bits=4),
                   nn.QuantizedEmbedding(vocab, 128, group_size=32, bits=8)):
        sharded = VocabShard(source, vocab, group)
        whole = source.as_linear(x) if hasattr(source, "as_linear") else source(x)
        difference = [mx.abs(sharded.as_linear(x) - whole).max().item()]
        if isinstance(source, nn.QuantizedEmbedding):
            difference.append(mx.abs(sharded(ids) - source(ids)).max().item())
        quantized[type(sharded.part).__name__] = [difference, sharded.part.weight.shape[0]]
    print(json.dumps({"cases": report, "quantized": quantized}), flush=True)
    """
)


def _ring(size: int, cases: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
    """Each rank's report for `cases` (model folder, layers, representation), one process a rank."""
    with tempfile.TemporaryDirectory(prefix="exo-vocab-") as folder:
        hostfile = Path(folder) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(size)]))
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", _RANK, json.dumps(cases), json.dumps(PROMPT)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)},
            )
            for rank in range(size)
        ]
        try:
            outputs = [process.communicate(timeout=300) for process in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
    for process, (_, errors) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, errors.decode()[-3000:]
    return [json.loads(output) for output, _ in outputs]


def _one_process(path: str, layers: int, representation: str) -> np.ndarray:
    import mlx.core as mx

    assert representation == "float32"
    shard = load_shard(Path(path), ShardSpec(start_layer=0, end_layer=layers, n_layers=layers), "float32")
    return np.array(shard.forward(mx.array([PROMPT]), shard.make_cache()).astype(mx.float32))


def _check(size: int, cases: list[tuple[str, int, str]], heads: list[set[str]], tied: list[bool]) -> None:
    reports = _ring(size, cases)
    for index, (case, head, tie) in enumerate(zip(cases, heads, tied, strict=True)):
        expected = _one_process(*case)
        vocab = expected.shape[-1]
        for rank, report in enumerate(reports):
            got = report["cases"][index]
            logits = np.array(got["logits"])
            assert logits.shape == expected.shape, case
            np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4, err_msg=str(case))
            assert (logits.argmax(-1) == expected.argmax(-1)).all(), case
            _, rows, _ = vocab_rows(vocab, size, rank)
            assert got["rows"] == got["held_rows"] == rows, case  # only its rows are held
            assert got["head"] in head, case
            assert got["lookup_sharded"] == tie, case  # a tied matrix serves the lookup sliced too
    for rank, report in enumerate(reports):
        rows = vocab_rows(517, size, rank)[1]
        linear, embedding = report["quantized"]["QuantizedLinear"], report["quantized"]["QuantizedEmbedding"]
        assert linear[1] == embedding[1] == rows
        assert max(linear[0]) < 1e-4 and max(embedding[0]) == 0.0  # a lookup is exact


@pytest.mark.slow
def test_two_ranks_gather_one_process_logits_for_every_head_representation() -> None:
    models, formats = tiny_models(), tiny_format_models()
    cases = [
        (str(models["llama"]), 6, "float32"),  # untied
        (str(models["qwen2"]), 6, "float32"),  # tied
        (str(formats["q4"]), 6, "float32"),  # 4-bit, widened
        (str(formats["q8"]), 6, "float32"),  # 8-bit tied, widened
    ]
    # A widened 4-bit head stays packed for exo's CPU kernel where it builds (KernelLinear); a
    # float32 one decodes through the kernel's float32 product there (FloatKernelLinear).
    heads = [{"Linear", "FloatKernelLinear"}, {"Embedding"}, {"Linear", "KernelLinear"}, {"Embedding"}]
    _check(2, cases, heads, [False, True, False, True])


@pytest.mark.slow
def test_three_ranks_with_a_vocabulary_that_does_not_divide(tmp_path: Path) -> None:
    spec = msgspec.structs.replace(
        TINY_SPECS["qwen2"], layers=2, hidden=192, intermediate=384, heads=6, kv_heads=3, seed=5
    )
    tied = write_synthetic_model(tmp_path / "tied", spec)
    untied = write_synthetic_model(
        tmp_path / "untied", msgspec.structs.replace(spec, tie_word_embeddings=False)
    )
    config = json.loads((tied / "config.json").read_text())
    assert config["vocab_size"] % 3 != 0  # the last rank's slice is short
    cases = [(str(tied), 2, "float32"), (str(untied), 2, "float32")]
    _check(3, cases, [{"Embedding"}, {"Linear", "FloatKernelLinear"}], [True, False])
