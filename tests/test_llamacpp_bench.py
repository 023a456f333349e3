"""bench/llamacpp_bench.py's numpy-only GGUF conversion: names, RoPE row order, bytes read."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from bench.llamacpp_bench import (
    _permute,  # pyright: ignore[reportPrivateUsage]
    build_from_sdist,
    decode_bytes_safetensors,
    find_llamacpp,
    gguf_name,
)
from exo.inference.synthetic import SyntheticModelSpec, write_synthetic_model


def test_hugging_face_llama_names_map_to_gguf_names() -> None:
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.norm.weight") == "output_norm.weight"
    assert gguf_name("model.layers.7.self_attn.o_proj.weight") == "blk.7.attn_output.weight"
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert gguf_name("model.layers.12.mlp.down_proj.weight") == "blk.12.ffn_down.weight"


@pytest.mark.parametrize(
    "name", ["model.layers.0.self_attn.q_proj.bias", "model.layers.x.mlp.up_proj.weight", ""]
)
def test_an_unknown_tensor_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unexpected tensor"):
        gguf_name(name)


def test_rope_rows_are_interleaved_per_head() -> None:
    # 2 heads of 4 rows: HF's halves [0 1 | 2 3] become llama.cpp's pairs [0 2 1 3].
    weights = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 3), dtype=np.float32)
    assert _permute(weights, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_bytes_read_per_token_leave_out_the_embedding_table(tmp_path: Path) -> None:
    spec = SyntheticModelSpec(layers=1, hidden=64, intermediate=128, heads=2, kv_heads=1, vocab=512)
    model = write_synthetic_model(tmp_path / "m", spec)
    per_layer = 4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64)
    assert decode_bytes_safetensors(model) == per_layer + 4 * (64 + 512 * 64)  # norm + lm_head


def test_an_sdist_without_llama_cpp_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pkg-1.0").mkdir()
    (tmp_path / "pkg-1.0" / "setup.py").write_text("")
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(tmp_path / "pkg-1.0", arcname="pkg-1.0")
    with pytest.raises(SystemExit, match=r"does not vendor llama\.cpp"):
        build_from_sdist(sdist, tmp_path / "work")


def test_a_folder_without_a_build_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no built llama-bench and llama-quantize"):
        find_llamacpp(tmp_path)


def test_a_build_is_found_with_its_gguf_py(tmp_path: Path) -> None:
    bin_dir = tmp_path / "build" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("llama-bench", "llama-quantize"):
        (bin_dir / tool).touch()
    with pytest.raises(SystemExit, match="no gguf-py"):
        find_llamacpp(tmp_path)
    (tmp_path / "gguf-py" / "gguf").mkdir(parents=True)
    assert find_llamacpp(tmp_path) == (bin_dir, tmp_path / "gguf-py")
    assert find_llamacpp(tmp_path / "build") == (bin_dir, tmp_path / "gguf-py")
