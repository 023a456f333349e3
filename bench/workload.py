"""What the suite asks the servers: models under test, prompts, and run sizes (default and --quick)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.http_stream import Messages
from exo.inference.corpus import ENGLISH_CORPUS
from exo.inference.models import get_model

# Same shape and seed as bench.pipeline_bench's model of the same name, so the two share one folder.
DEFAULT_MODEL_ARGUMENTS = [
    "--arch", "llama", "--layers", "8", "--hidden", "1024", "--intermediate", "2816",
    "--heads", "16", "--kv-heads", "8", "--vocab", "1024", "--seed", "0",
]  # fmt: skip
QUICK_MODEL_ARGUMENTS = [
    "--arch", "llama", "--layers", "4", "--hidden", "256", "--intermediate", "512",
    "--heads", "4", "--kv-heads", "2", "--vocab", "1024", "--seed", "0",
]  # fmt: skip
DEFAULT_MODEL_NAME = "bench-l8-h1024-i2816-v1024"
QUICK_MODEL_NAME = "bench-l4-h256-i512-v1024"


def model_shape_arguments(arguments: list[str]) -> list[str]:
    """The synthetic maker's shape flags that bench.pipeline_bench also takes."""
    shape: list[str] = []
    for flag in ("--layers", "--hidden", "--intermediate", "--heads", "--kv-heads", "--vocab"):
        shape += [flag, arguments[arguments.index(flag) + 1]]
    return shape


@dataclass(frozen=True)
class Settings:
    rounds: int
    decode_tokens: int  # single-stream measurements
    concurrent_tokens: int  # per stream when several run at once
    streams: int
    user_chars: int  # single-stream prompts
    concurrent_user_chars: int  # short, so that concurrent runs measure decoding more than prefill
    system_chars: int  # the long first turn of the prefix-cache chat
    turn_one_tokens: int
    turn_two_tokens: int
    blas_prompt_tokens: int  # prefill on the reference BLAS is slow: keep it short
    blas_tokens: int


DEFAULT_SETTINGS = Settings(
    rounds=3, decode_tokens=64, concurrent_tokens=32, streams=8, user_chars=200, concurrent_user_chars=60,
    system_chars=800,
    turn_one_tokens=16, turn_two_tokens=8, blas_prompt_tokens=8, blas_tokens=16,
)  # fmt: skip
QUICK_SETTINGS = Settings(
    rounds=2, decode_tokens=16, concurrent_tokens=8, streams=8, user_chars=120, concurrent_user_chars=40,
    system_chars=400,
    turn_one_tokens=8, turn_two_tokens=4, blas_prompt_tokens=8, blas_tokens=8,
)  # fmt: skip


@dataclass(frozen=True)
class ModelUnderTest:
    path: Path  # the model; one instance of it is placed on one node
    copy: Path  # the same weights under another id, for a second instance beside the first
    parameters: int
    weight_bytes: int
    eos_ids: list[int]

    @classmethod
    def describe(cls, path: Path, copy: Path, eos_ids: list[int]) -> ModelUnderTest:
        info = get_model(path.parent, path.name)
        return cls(path, copy, info.total_weight_bytes // 4, info.total_weight_bytes, eos_ids)

    @property
    def summary(self) -> str:
        return (
            f"{self.path.name}, synthetic float32 llama, {self.parameters / 1e6:.0f}M parameters, "
            f"{self.weight_bytes / 2**20:.0f} MiB of weights"
        )


def corpus_text(chars: int, offset: int = 0) -> str:
    """`chars` characters of English from the built-in corpus, starting `offset` lines in."""
    lines = ENGLISH_CORPUS.splitlines()
    text = ""
    index = offset
    while len(text) < chars:
        text += lines[index % len(lines)] + " "
        index += 1
    return text[:chars].rstrip()


def user_messages(tag: str, chars: int) -> Messages:
    """A one-turn chat whose first words are unique (`tag`), so no server's prompt cache holds it."""
    return [{"role": "user", "content": f"{tag}. {corpus_text(chars, offset=len(tag))}"}]


def system_prompt(nonce: int, chars: int) -> str:
    return f"Session {nonce:06d}. {corpus_text(chars)}"


def first_turn(nonce: int, chars: int) -> Messages:
    return [
        {"role": "system", "content": system_prompt(nonce, chars)},
        {"role": "user", "content": "Tell me about the text above."},
    ]


def second_turn(nonce: int, chars: int, answer: str) -> Messages:
    return [
        *first_turn(nonce, chars),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And what happens next?"},
    ]
