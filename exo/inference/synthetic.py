"""Seeded random-weight models in the real Hugging Face layout.

No model hub is reachable from the machines exo is developed and tested on, so models are made
locally: config.json, model.safetensors (float32, or bfloat16 / float16, or quantized by mlx-lm's own
`quantize_model` and saved in mlx-lm's layout: packed uint32 weights with scales and biases in the
dtype of the weights, a "quantization" key in config.json, as the MLX community's Hub conversions
are), tokenizer.json (byte-level BPE trained with
`tokenizers` on a small built-in English corpus, so any text encodes), tokenizer_config.json with a
ChatML-style chat template. mlx_lm.load and transformers' AutoTokenizer read the folder as they
would a downloaded one. Same arguments and seed give byte-identical weights.

`python -m exo.inference.synthetic OUT [--arch llama|qwen2] [--layers N] [--dtype bfloat16]
[--quantize 4 [--group-size 64]] ...`
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np
from safetensors.numpy import save_file

from exo.inference.chat_templates import CHATML_TEMPLATE, QWEN2_TOOLS_TEMPLATE, THINKING_TOOLS_TEMPLATE
from exo.inference.corpus import ENGLISH_CORPUS

Architecture = Literal["llama", "qwen2"]
# "chatml": plain ChatML; "tools": ChatML that renders tools and calls (Hermes / Qwen 2.5 form).
# "thinking": "tools" plus Qwen 3's thinking block (adds <think> and </think> to the vocabulary).
TemplateName = Literal["chatml", "tools", "thinking"]
WeightDtype = Literal["float32", "bfloat16", "float16"]
QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)  # mlx's affine quantization
GROUP_SIZES = (32, 64, 128)

BUILTIN_MODEL_ID = "exo-tiny"
END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]
# Added (not special) tokens, as in Qwen2: tool calls are text a client can see and parse.
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]
LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
THINK_TOKENS = ["<think>", "</think>"]


class SyntheticModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    architecture: Architecture = "llama"
    layers: int = 8
    hidden: int = 256
    intermediate: int = 512
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 1024
    seed: int = 0
    # Random weights at the usual 0.02 scale give near-flat logits and greedy output that repeats one
    # token; larger projections make it vary, which exactness tests need.
    proj_scale: float = 3.0
    tie_word_embeddings: bool | None = None  # None: the architecture's usual choice
    template: TemplateName | None = None  # None: "tools" for qwen2, "chatml" for llama
    # The saved format. Quantized models keep scales and biases (and norms) in `dtype`: bfloat16
    # with a quantization is what a Hub model converted by mlx_lm.convert looks like.
    dtype: WeightDtype = "float32"
    quantize_bits: int | None = None
    group_size: int = 64

    def validate(self) -> None:
        if self.architecture not in ("llama", "qwen2"):
            raise ValueError(f"unknown architecture {self.architecture!r}: use llama or qwen2")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {self.dtype!r}: use float32, bfloat16 or float16")
        if self.quantize_bits is not None and self.quantize_bits not in QUANTIZE_BITS:
            raise ValueError(f"quantize bits must be one of {QUANTIZE_BITS}, got {self.quantize_bits}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.quantize_bits is not None and (
            self.hidden % self.group_size or self.intermediate % self.group_size
        ):
            raise ValueError(
                f"hidden ({self.hidden}) and intermediate ({self.intermediate}) must be multiples of "
                f"the group size ({self.group_size}) to quantize every layer"
            )
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if (self.hidden // self.heads) % 2:
            raise ValueError("head size (hidden / heads) must be even for rotary embeddings")
        if self.vocab < 300:
            raise ValueError("vocab must be at least 300 (256 byte tokens plus merges and specials)")

    @property
    def chat_template(self) -> str:
        name = self.template or ("tools" if self.architecture == "qwen2" else "chatml")
        return {
            "chatml": CHATML_TEMPLATE,
            "tools": QWEN2_TOOLS_TEMPLATE,
            "thinking": THINKING_TOOLS_TEMPLATE,
        }[name]

    @property
    def added_tokens(self) -> list[str]:
        return TOOL_TOKENS + THINK_TOKENS if self.template == "thinking" else TOOL_TOKENS

    @property
    def tied(self) -> bool:
        if self.tie_word_embeddings is not None:
            return self.tie_word_embeddings
        return self.architecture == "qwen2"


def train_tokenizer(vocab_size: int, added_tokens: list[str] = TOOL_TOKENS) -> tuple[object, int]:
    """Byte-level BPE over the built-in corpus; returns (tokenizers.Tokenizer, actual vocab size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added_tokens),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(ENGLISH_CORPUS.split("\n"), trainer=trainer)
    tokenizer.add_tokens(added_tokens)
    return tokenizer, tokenizer.get_vocab_size()


def _config(spec: SyntheticModelSpec, vocab_size: int, eos_ids: list[int]) -> dict[str, object]:
    head_dim = spec.hidden // spec.heads
    common: dict[str, object] = {
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tied,
        "torch_dtype": spec.dtype,
        "bos_token_id": None,
        "eos_token_id": eos_ids,
        "exo_synthetic": {"seed": spec.seed, "proj_scale": spec.proj_scale},
    }
    if spec.architecture == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0, **common}
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0, **common}


def _weights(spec: SyntheticModelSpec, vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    head_dim = spec.hidden // spec.heads
    std = 0.02

    def normal(shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std * scale)).astype(np.float32)

    projection = spec.proj_scale
    weights: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((vocab_size, spec.hidden))}
    for index in range(spec.layers):
        prefix = f"model.layers.{index}"
        weights[f"{prefix}.input_layernorm.weight"] = np.ones(spec.hidden, dtype=np.float32)
        weights[f"{prefix}.post_attention_layernorm.weight"] = np.ones(spec.hidden, dtype=np.float32)
        weights[f"{prefix}.self_attn.q_proj.weight"] = normal(
            (spec.heads * head_dim, spec.hidden), projection
        )
        weights[f"{prefix}.self_attn.k_proj.weight"] = normal(
            (spec.kv_heads * head_dim, spec.hidden), projection
        )
        weights[f"{prefix}.self_attn.v_proj.weight"] = normal(
            (spec.kv_heads * head_dim, spec.hidden), projection
        )
        weights[f"{prefix}.self_attn.o_proj.weight"] = normal(
            (spec.hidden, spec.heads * head_dim), projection
        )
        if spec.architecture == "qwen2":
            weights[f"{prefix}.self_attn.q_proj.bias"] = normal((spec.heads * head_dim,))
            weights[f"{prefix}.self_attn.k_proj.bias"] = normal((spec.kv_heads * head_dim,))
            weights[f"{prefix}.self_attn.v_proj.bias"] = normal((spec.kv_heads * head_dim,))
        weights[f"{prefix}.mlp.gate_proj.weight"] = normal((spec.intermediate, spec.hidden), projection)
        weights[f"{prefix}.mlp.up_proj.weight"] = normal((spec.intermediate, spec.hidden), projection)
        weights[f"{prefix}.mlp.down_proj.weight"] = normal((spec.hidden, spec.intermediate), projection)
    weights["model.norm.weight"] = np.ones(spec.hidden, dtype=np.float32)
    if not spec.tied:
        weights["lm_head.weight"] = normal((vocab_size, spec.hidden))
    return weights


def _tokenizer_config(spec: SyntheticModelSpec) -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": spec.chat_template,
    }


def write_synthetic_model(out: Path, spec: SyntheticModelSpec, shards: int = 1) -> Path:
    """Write the model folder at `out` (must not exist); atomic: built beside it, then renamed.

    With `shards` > 1 the weights are split by layers over that many files with a
    model.safetensors.index.json, as large models are published on the Hub (a pipeline stage then
    needs only some of the files)."""
    spec.validate()
    if not 1 <= shards <= spec.layers:
        raise ValueError(f"shards must be between 1 and the number of layers ({spec.layers}), got {shards}")
    if shards > 1 and (spec.dtype != "float32" or spec.quantize_bits is not None):
        raise ValueError("shards > 1 is for float32 models (mlx-lm's save_model shards by size)")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        tokenizer, vocab_size = train_tokenizer(spec.vocab, spec.added_tokens)
        eos_ids = [tokenizer.token_to_id(IM_END), tokenizer.token_to_id(END_OF_TEXT)]  # type: ignore[attr-defined]
        tokenizer.save(str(building / "tokenizer.json"))  # type: ignore[attr-defined]
        (building / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(spec), indent=2))
        (building / "special_tokens_map.json").write_text(
            json.dumps({"eos_token": IM_END, "pad_token": END_OF_TEXT}, indent=2)
        )
        config = _config(spec, vocab_size, eos_ids)
        (building / "config.json").write_text(json.dumps(config, indent=2))
        (building / "generation_config.json").write_text(
            json.dumps({"eos_token_id": eos_ids, "do_sample": False}, indent=2)
        )
        if spec.dtype == "float32" and spec.quantize_bits is None:
            _save_weights(building, _weights(spec, vocab_size), spec.layers, shards)
        else:
            _save_with_mlx_lm(building, spec, config, _weights(spec, vocab_size))
        # mkdtemp makes a private folder; a model folder is ordinary data that others may read.
        for written in building.iterdir():
            written.chmod(0o644)
        building.chmod(0o755)
        os.replace(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return out


def _save_weights(folder: Path, weights: dict[str, np.ndarray], n_layers: int, shards: int) -> None:
    if shards == 1:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = [f"model-{number:05d}-of-{shards:05d}.safetensors" for number in range(1, shards + 1)]
    parts: list[dict[str, np.ndarray]] = [{} for _ in names]
    for tensor_name, array in weights.items():
        match = LAYER_NAME.search(tensor_name)
        if match is not None:
            part = int(match.group(1)) * shards // n_layers
        elif "embed_tokens" in tensor_name:
            part = 0
        else:
            part = shards - 1  # final norm and lm_head
        parts[part][tensor_name] = array
    weight_map: dict[str, str] = {}
    for name, part in zip(names, parts, strict=True):
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(array.nbytes for array in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _save_with_mlx_lm(
    folder: Path, spec: SyntheticModelSpec, config: dict[str, object], weights: dict[str, np.ndarray]
) -> None:
    """Cast (and quantize) the float32 weights with mlx-lm's model class and save them as mlx-lm's
    own convert does: its quantize_model, save_model and save_config."""
    import contextlib
    import sys

    import mlx.core as mx
    from mlx_lm.utils import quantize_model, save_config, save_model

    from exo.inference.shard import model_classes

    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    model.load_weights([(name, mx.array(array)) for name, array in weights.items()])
    model.set_dtype(getattr(mx, spec.dtype))
    if spec.quantize_bits is not None:
        with contextlib.redirect_stdout(sys.stderr):  # it prints bits per weight
            model, config = quantize_model(model, config, spec.group_size, spec.quantize_bits)
    save_model(folder, model)
    save_config(dict(config), folder / "config.json")


# Its template renders tools, so `tools` work on the default model.
BUILTIN_SPEC = SyntheticModelSpec(
    architecture="llama",
    layers=8,
    hidden=256,
    intermediate=512,
    heads=4,
    kv_heads=2,
    vocab=1024,
    seed=0,
    template="tools",
)


def ensure_builtin_model(models_dir: Path) -> Path:
    """The default `exo-tiny` model in `models_dir`, made if missing (safe if two processes race)."""
    target = Path(models_dir) / BUILTIN_MODEL_ID
    if (target / "config.json").is_file():
        _update_builtin_template(target)
        return target
    try:
        return write_synthetic_model(target, BUILTIN_SPEC)
    except (FileExistsError, OSError):
        # Another process renamed its copy into place first; theirs is as good as ours.
        if (target / "config.json").is_file():
            return target
        raise


def _update_builtin_template(target: Path) -> None:
    """A copy made by an older exo has the plain ChatML template: give it the one that renders
    tools (same weights and tokenizer; only tokenizer_config.json changes, atomically)."""
    config_path = target / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(config, dict) or config.get("chat_template") != CHATML_TEMPLATE:
        return
    config["chat_template"] = BUILTIN_SPEC.chat_template
    fresh = config_path.with_name(f".{config_path.name}.updating-{os.getpid()}")
    try:
        fresh.write_text(json.dumps(config, indent=2))
        fresh.chmod(0o644)
        os.replace(fresh, config_path)
    except OSError:
        fresh.unlink(missing_ok=True)  # a read-only models dir: keep the old template


def parse_arguments(argv: list[str] | None = None) -> tuple[Path, SyntheticModelSpec, int]:
    parser = argparse.ArgumentParser(
        prog="python -m exo.inference.synthetic", description="Write a seeded random-weight model."
    )
    parser.add_argument("out", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--layers", type=int, default=BUILTIN_SPEC.layers)
    parser.add_argument("--hidden", type=int, default=BUILTIN_SPEC.hidden)
    parser.add_argument("--intermediate", type=int, default=BUILTIN_SPEC.intermediate)
    parser.add_argument("--heads", type=int, default=BUILTIN_SPEC.heads)
    parser.add_argument("--kv-heads", type=int, default=BUILTIN_SPEC.kv_heads)
    parser.add_argument("--vocab", type=int, default=BUILTIN_SPEC.vocab)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proj-scale", type=float, default=BUILTIN_SPEC.proj_scale)
    parser.add_argument("--shards", type=int, default=1, help="weight files, split by layers (with an index)")
    parser.add_argument("--template", choices=["chatml", "tools", "thinking"], default=None)
    tie = parser.add_mutually_exclusive_group()
    tie.add_argument("--tie", dest="tie", action="store_true", default=None, help="tie lm_head to embeddings")
    tie.add_argument("--no-tie", dest="tie", action="store_false", help="separate lm_head")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="weights' dtype (and, quantized, the scales' and norms': bfloat16 as in Hub conversions)",
    )
    parser.add_argument(
        "--quantize",
        type=int,
        metavar="BITS",
        default=None,
        help=f"mlx-lm affine quantization, {QUANTIZE_BITS}",
    )
    parser.add_argument("--group-size", type=int, default=64, help=f"quantization group size, {GROUP_SIZES}")
    arguments = parser.parse_args(argv)
    spec = SyntheticModelSpec(
        architecture=arguments.arch,
        layers=arguments.layers,
        hidden=arguments.hidden,
        intermediate=arguments.intermediate,
        heads=arguments.heads,
        kv_heads=arguments.kv_heads,
        vocab=arguments.vocab,
        seed=arguments.seed,
        proj_scale=arguments.proj_scale,
        tie_word_embeddings=arguments.tie,
        template=arguments.template,
        dtype=arguments.dtype,
        quantize_bits=arguments.quantize,
        group_size=arguments.group_size,
    )
    try:
        spec.validate()
    except ValueError as error:
        parser.error(str(error))
    if not 1 <= arguments.shards <= spec.layers:
        parser.error(f"--shards must be between 1 and --layers ({spec.layers})")
    if arguments.shards > 1 and (spec.dtype != "float32" or spec.quantize_bits is not None):
        parser.error("--shards is for float32 models (mlx-lm's save_model shards by size)")
    return arguments.out, spec, arguments.shards


def main(argv: list[str] | None = None) -> None:
    out, spec, shards = parse_arguments(argv)
    try:
        written = write_synthetic_model(out, spec, shards)
    except FileExistsError as error:
        raise SystemExit(f"error: {error}") from None
    print(written)


if __name__ == "__main__":
    main()
