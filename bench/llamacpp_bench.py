"""exo's CPU decode against llama.cpp on the same weights, same threads, same run.

`python -m bench.llamacpp_bench (--llamacpp DIR | --sdist llama_cpp_python-X.tar.gz) [--threads 2,1]
[--tokens 64] [--rounds 3]`

llama.cpp comes from llama-cpp-python's sdist, which vendors it with gguf-py; nothing is
downloaded at run time. Fetch the sdist once from PyPI with
`pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d DIR`. `--sdist` unpacks and
builds it (cmake, Release, GGML_NATIVE=ON: llama.cpp's default, -march=native; only the
llama-bench and llama-quantize targets); `--llamacpp` (or EXO_LLAMACPP) names a llama.cpp source
tree already built in DIR/build, or that build folder itself.

The suite's model (8 layers, hidden 1024, intermediate 2816, ~96M parameters) is written by
`exo.inference.synthetic` as float32, and as mlx-lm 8-bit and 4-bit from bfloat16 (group 64,
bfloat16 scales and biases, as Hub conversions are: 8.5 and 4.5 bits a weight, the same as Q8_0 and
Q4_0). The float32 safetensors become a GGUF F32 file through the vendored gguf-py (numpy only:
HF names to GGUF names, q/k rows permuted as convert_hf_to_gguf.py does, the byte-level BPE
tokenizer), then Q8_0 and Q4_0 with `llama-quantize --pure` (every matrix, embeddings and output
included, as mlx-lm quantizes them). Each round measures, alternating the order, for each thread
count: exo's decode of `--tokens` tokens (one worker process per thread count, MKL and exo's kernel
at that many threads, `load_shard(..., "float32")` as a runner loads a stage, no HTTP) and
`llama-bench -p 0 -n TOKENS -t THREADS -r 1` (after its warm-up) on each format. It prints tok/s,
the ratios, and the bytes of weights each reads per token (all but the embedding table) times
tok/s against the machine's copy bandwidth. Not part of `python -m bench`; docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = {"f32": "F32", "q8": "Q8_0", "q4": "Q4_0"}
ENGINES = ("exo", "llama.cpp")
EXO_FORMATS: dict[str, list[str]] = {
    "f32": [],
    "q8": ["--dtype", "bfloat16", "--quantize", "8"],
    "q4": ["--dtype", "bfloat16", "--quantize", "4"],
}
MODEL_ARGUMENTS = ["--layers", "8", "--hidden", "1024", "--intermediate", "2816", "--heads", "16"]
MODEL_ARGUMENTS += ["--kv-heads", "8", "--vocab", "1024"]
PROMPT = [3, 50, 70, 90, 11]
BUILD_TIMEOUT_S = 3600


def find_llamacpp(root: Path) -> tuple[Path, Path]:
    """(folder with llama-bench and llama-quantize, gguf-py folder) of a built llama.cpp tree."""
    for bin_dir in (root / "build" / "bin", root / "bin", root / "vendor" / "llama.cpp" / "build" / "bin"):
        if (bin_dir / "llama-bench").exists() and (bin_dir / "llama-quantize").exists():
            for source in (bin_dir.parent.parent, bin_dir.parent, root, root / "vendor" / "llama.cpp"):
                if (source / "gguf-py" / "gguf").is_dir():
                    return bin_dir, source / "gguf-py"
            raise SystemExit(f"{bin_dir} has llama.cpp's tools but no gguf-py next to its sources")
    raise SystemExit(f"no built llama-bench and llama-quantize under {root} (build/bin or bin)")


def build_from_sdist(sdist: Path, work: Path) -> Path:
    """Unpack llama-cpp-python's sdist into `work` and build its vendored llama.cpp's two tools."""
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        archive.extractall(work, filter="data")
    source = work / top / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        raise SystemExit(f"{sdist} does not vendor llama.cpp (no vendor/llama.cpp/CMakeLists.txt)")
    configure = ["cmake", "-S", str(source), "-B", str(source / "build"), "-DCMAKE_BUILD_TYPE=Release"]
    configure += ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    compile_ = ["cmake", "--build", str(source / "build"), "-j", str(os.cpu_count() or 1)]
    compile_ += ["--target", "llama-bench", "llama-quantize"]
    for step in (configure, compile_):
        print(" ".join(step), flush=True)
        subprocess.run(step, check=True, timeout=BUILD_TIMEOUT_S)
    return source


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows to llama.cpp's interleaved RoPE order (convert_hf_to_gguf.py)."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
OTHER_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def gguf_name(name: str) -> str:
    """GGUF tensor name of a Hugging Face llama tensor name."""
    if name in OTHER_TENSORS:
        return OTHER_TENSORS[name]
    match = LAYER_TENSOR.fullmatch(name)
    if match is None or match.group(2) not in LAYER_TENSORS:
        raise ValueError(f"unexpected tensor {name!r} for a llama model")
    return f"blk.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.weight"


def convert_to_gguf(model: Path, out: Path, gguf: Any) -> Path:
    """A float32 llama safetensors folder (exo's synthetic layout) as a GGUF F32 file."""
    from safetensors.numpy import load_file

    config = json.loads((model / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise SystemExit(f"{model} is not a llama model (model_type {config.get('model_type')!r})")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(model.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, model, config["vocab_size"], gguf)
    weights = load_file(str(model / "model.safetensors"))
    for name in sorted(weights):
        array = weights[name].astype(np.float32)
        if name.endswith("q_proj.weight"):
            array = _permute(array, heads)
        elif name.endswith("k_proj.weight"):
            array = _permute(array, kv_heads)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer: Any, model: Path, vocab_size: int, gguf: Any) -> None:
    """The byte-level BPE of tokenizer.json as llama.cpp's "gpt2" tokenizer."""
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in tokenizer["model"]["vocab"].items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in tokenizer["added_tokens"]:
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        tokens[added["id"]], types[added["id"]] = added["content"], kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(next(a["id"] for a in tokenizer["added_tokens"] if a["special"]))


def decode_bytes_gguf(path: Path, gguf: Any) -> int:
    """Bytes of weights a decode step reads from a GGUF file: all but the embedding table."""
    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


def decode_bytes_safetensors(model: Path) -> int:
    """The same for an exo checkpoint as its stage holds it (packed where quantized), from the
    safetensors header (numpy has no bfloat16)."""
    with (model / "model.safetensors").open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return sum(
        entry["data_offsets"][1] - entry["data_offsets"][0]
        for name, entry in header.items()
        if name != "__metadata__" and "embed_tokens" not in name
    )


def exo_worker(paths: dict[str, str], tokens: int) -> None:
    """Child process: load each checkpoint as a whole-model stage, then decode on request
    (one format name per stdin line, one tok/s per stdout line)."""
    from exo.inference.blas import load_optimized_blas

    load_optimized_blas(int(os.environ["EXO_KERNEL_THREADS"]))
    import mlx.core as mx

    from exo.inference.shard import ShardModel, ShardSpec, load_shard

    config = json.loads((Path(next(iter(paths.values()))) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    spec = ShardSpec(start_layer=0, end_layer=layers, n_layers=layers)
    shards: dict[str, ShardModel] = {name: load_shard(Path(p), spec, "float32") for name, p in paths.items()}

    def decode(shard: ShardModel) -> float:
        cache = shard.make_cache()
        out = shard.forward(mx.array([PROMPT]), cache)
        token = mx.argmax(out[:, -1], axis=-1)
        mx.eval(token)
        started = time.perf_counter()
        for _ in range(tokens):
            out = shard.forward(token[:, None], cache)
            token = mx.argmax(out[:, -1], axis=-1)
            mx.async_eval(token)
        mx.eval(token)
        return tokens / (time.perf_counter() - started)

    for shard in shards.values():
        decode(shard)  # warm-up, as llama-bench does
    print("ready", flush=True)
    for line in sys.stdin:
        print(f"{decode(shards[line.strip()]):.3f}", flush=True)


class ExoWorker:
    """One worker process at a fixed thread count (MKL's and the kernel's are fixed per process)."""

    def __init__(self, paths: dict[str, Path], threads: int, tokens: int) -> None:
        environment = {**os.environ, "EXO_KERNEL_THREADS": str(threads), "EXO_KERNEL": "on"}
        arguments = json.dumps({name: str(path) for name, path in paths.items()})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.llamacpp_bench", "--worker", arguments, "--tokens", str(tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment,
        )  # fmt: skip
        self._read()  # "ready"

    def _read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"exo worker exited ({self.process.wait()})")
        return line.strip()

    def decode(self, name: str) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def llama_bench(bin_dir: Path, model: Path, threads: int, tokens: int) -> float:
    """llama-bench's decode tok/s for `tokens` tokens (one repetition after its warm-up)."""
    command = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(tokens)]
    command += ["-t", str(threads), "-r", "1", "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    return float(json.loads(done.stdout)[0]["avg_ts"])


def make_models(work: Path, gguf: Any, bin_dir: Path | None) -> tuple[dict[str, Path], dict[str, Path]]:
    """exo's three checkpoints and llama.cpp's three GGUF files of the same weights."""
    exo_models: dict[str, Path] = {}
    for name, extra in EXO_FORMATS.items():
        exo_models[name] = work / f"exo-{name}"
        if not exo_models[name].exists():
            command = [sys.executable, "-m", "exo.inference.synthetic", str(exo_models[name])]
            subprocess.run([*command, *MODEL_ARGUMENTS, *extra], check=True, capture_output=True)
    ggufs = {"f32": work / "model-F32.gguf"}
    if not ggufs["f32"].exists():
        convert_to_gguf(exo_models["f32"], ggufs["f32"], gguf)
    for name in ("q8", "q4"):
        ggufs[name] = work / f"model-{FORMATS[name]}.gguf"
        if not ggufs[name].exists() and bin_dir is not None:
            command = [str(bin_dir / "llama-quantize"), "--pure", str(ggufs["f32"]), str(ggufs[name])]
            subprocess.run([*command, FORMATS[name]], check=True, capture_output=True, timeout=600)
    return exo_models, ggufs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.llamacpp_bench", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--llamacpp", type=Path, default=os.environ.get("EXO_LLAMACPP"))
    where.add_argument("--sdist", type=Path, help="llama-cpp-python's sdist (.tar.gz) to build")
    parser.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, help="folder for models and the build (kept; reused)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.worker is not None:
        exo_worker(json.loads(arguments.worker), arguments.tokens)
        return
    threads = [int(t) for t in arguments.threads.split(",")]
    if any(t < 1 for t in threads) or arguments.tokens < 1 or arguments.rounds < 1:
        parser.error("--threads, --tokens and --rounds must be positive")
    work = arguments.work or Path(tempfile.mkdtemp(prefix="exo-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    if arguments.sdist is not None:
        root = build_from_sdist(arguments.sdist, work)
    elif arguments.llamacpp is not None:
        root = arguments.llamacpp
    else:
        parser.error("name a built llama.cpp (--llamacpp DIR or EXO_LLAMACPP) or an sdist (--sdist)")
    bin_dir, gguf_py = find_llamacpp(root)
    sys.path.insert(0, str(gguf_py))
    gguf = importlib.import_module("gguf")  # the vendored gguf-py, not an installed package

    exo_models, ggufs = make_models(work, gguf, bin_dir)
    read = {("exo", name): decode_bytes_safetensors(path) for name, path in exo_models.items()} | {
        ("llama.cpp", name): decode_bytes_gguf(path, gguf) for name, path in ggufs.items()
    }
    from bench.machine import memory_bandwidth

    workers = {t: ExoWorker(exo_models, t, arguments.tokens) for t in threads}
    results: dict[tuple[str, str, int], list[float]] = {}
    bandwidths: list[float] = []
    try:
        for number in range(arguments.rounds):
            steps = [
                (engine, name, t) for t in threads for name in FORMATS for engine in ("exo", "llama.cpp")
            ]
            for engine, name, t in steps if number % 2 == 0 else list(reversed(steps)):
                value = (
                    workers[t].decode(name)
                    if engine == "exo"
                    else llama_bench(bin_dir, ggufs[name], t, arguments.tokens)
                )
                results.setdefault((engine, name, t), []).append(value)
            bandwidths.append(memory_bandwidth(repeats=3) / 1e9)
    finally:
        for worker in workers.values():
            worker.close()
    report(results, read, bandwidths, threads)


def report(
    results: dict[tuple[str, str, int], list[float]],
    read: dict[tuple[str, str], int],
    bandwidths: list[float],
    threads: list[int],
) -> None:
    bandwidth = statistics.median(bandwidths)
    print(f"load average {os.getloadavg()}, copy bandwidth (numpy, all cores) {bandwidth:.1f} GB/s")
    print("| threads | format | engine | MiB read/token | tok/s median (rounds) | GB/s read | of copy bw |")
    print("|---|---|---|---|---|---|---|")
    for t in threads:
        for name, gguf_type in FORMATS.items():
            for engine in ("exo", "llama.cpp"):
                values = results[(engine, name, t)]
                label = f"{name} (mlx-lm)" if engine == "exo" and name != "f32" else gguf_type
                gb = statistics.median(values) * read[(engine, name)] / 1e9
                print(
                    f"| {t} | {label} | {engine} | {read[(engine, name)] / 2**20:.0f} | "
                    f"{statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)}) | "
                    f"{gb:.1f} | {gb / bandwidth:.2f} |"
                )
    print("\n| threads | exo / llama.cpp | median | per round |\n|---|---|---|---|")
    for t in threads:
        for name, gguf_type in FORMATS.items():
            exo, llama = results[("exo", name, t)], results[("llama.cpp", name, t)]
            per_round = [e / g for e, g in zip(exo, llama, strict=True)]
            ratio = statistics.median(exo) / statistics.median(llama)
            print(
                f"| {t} | {name} / {gguf_type} | {ratio:.2f}x | {', '.join(f'{r:.2f}' for r in per_round)} |"
            )


if __name__ == "__main__":
    main()
