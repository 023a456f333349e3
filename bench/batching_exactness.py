"""How far batching and the prefix cache move the numbers, on the tiny test models, in one process.

    .venv/bin/python -m bench.batching_exactness [--steps 40]

For each tiny test model (tests/harness/inference_helpers.py), 8 prompts decoded greedily alone, then the
same steps batched 8 at once (the same tokens fed, so the rows compare step for step):
- the largest |log-probability| difference between a batched row and the same step alone;
- the smallest gap between the two most likely tokens seen alone (a flip needs a gap below the
  difference);
- whether any greedy token differs.
Then a two-turn chat with and without the prefix cache: the largest |log-probability| difference
of turn two's steps. Also the matmul alone: how many rows a float32 GEMM takes before a row stops
being bit-identical to the same row computed alone. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Sequence
from typing import Any

from exo.inference.blas import load_optimized_blas

BLAS = load_optimized_blas()

import mlx.core as mx  # noqa: E402 (after the BLAS choice)
from tokenizers import Tokenizer  # noqa: E402

from bench.machine import describe_machine  # noqa: E402
from exo.inference.batching import enable_row_attention, forward_rows  # noqa: E402
from exo.inference.frames import prefill_chunks  # noqa: E402
from exo.inference.prefix_cache import KVSnapshots  # noqa: E402
from exo.inference.sampling import logprobs_from_logits  # noqa: E402
from exo.inference.shard import ShardModel, ShardSpec, load_shard  # noqa: E402
from tests.harness.inference_helpers import N_LAYERS, PREFILL_STEP_SIZE, tiny_models  # noqa: E402
from tests.harness.prompts import NEXT_USER, TEXTS, TURN_ONE  # noqa: E402


def prefill(shard: ShardModel, prompt: list[int], cache: Sequence[Any], start: int = 0) -> mx.array:
    logits = mx.array(0)
    for begin, end in prefill_chunks(len(prompt), PREFILL_STEP_SIZE, start):
        logits = shard.forward(mx.array(prompt[begin:end])[None], cache)
    return logprobs_from_logits(logits)


def greedy_alone(shard: ShardModel, prompt: list[int], steps: int) -> tuple[list[int], list[mx.array]]:
    cache = shard.make_cache()
    logprobs = [prefill(shard, prompt, cache)]
    tokens: list[int] = []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logprobs[-1], axis=-1).item()))  # pyright: ignore[reportArgumentType]
        logprobs.append(logprobs_from_logits(shard.forward(mx.array([[tokens[-1]]]), cache)))
    return tokens, logprobs[:-1]


def batching(shard: ShardModel, prompts: list[list[int]], steps: int) -> dict[str, object]:
    alone = [greedy_alone(shard, prompt, steps) for prompt in prompts]
    gaps = [
        float((top[-1] - top[-2]).item())  # pyright: ignore[reportArgumentType]
        for _, logprobs in alone
        for step in logprobs
        if (top := mx.sort(step[0])) is not None
    ]
    caches = [shard.make_cache() for _ in prompts]
    batched = [[prefill(shard, prompt, cache)] for prompt, cache in zip(prompts, caches, strict=True)]
    flipped = 0
    for step in range(1, steps):
        inputs = mx.array([[tokens[step - 1]] for tokens, _ in alone])
        logits = mx.split(forward_rows(shard, inputs, caches), len(prompts))
        for position, row in enumerate(logprobs_from_logits(row_logits) for row_logits in logits):
            batched[position].append(row)
            flipped += int(mx.argmax(row, axis=-1).item() != alone[position][0][step])  # pyright: ignore[reportArgumentType]
    difference = max(
        float(mx.max(mx.abs(one - other)).item())  # pyright: ignore[reportArgumentType]
        for (_, alone_steps), batched_steps in zip(alone, batched, strict=True)
        for one, other in zip(alone_steps, batched_steps, strict=True)
    )
    return {"max_logprob_difference": difference, "min_top_two_gap": min(gaps), "tokens_flipped": flipped}


def prefix_reuse(shard: ShardModel, tokenizer: Tokenizer, steps: int) -> dict[str, object]:
    turn_one = tokenizer.encode(TURN_ONE).ids
    answer, _ = greedy_alone(shard, turn_one, steps)
    cache = shard.make_cache()
    prefill(shard, turn_one, cache)
    for token in answer[:-1]:
        shard.forward(mx.array([[token]]), cache)
    snapshots = KVSnapshots()
    kept = len(turn_one) + len(answer) - 1
    snapshots.save("turn-1", cache, kept)
    turn_two = turn_one + answer + tokenizer.encode(NEXT_USER).ids
    fresh_tokens, fresh = greedy_alone(shard, turn_two, steps)
    reused_cache = snapshots.restore("turn-1", kept)
    assert reused_cache is not None
    reused = [prefill(shard, turn_two, reused_cache, start=kept)]
    for token in fresh_tokens[:-1]:
        reused.append(logprobs_from_logits(shard.forward(mx.array([[token]]), reused_cache)))
    difference = max(
        float(mx.max(mx.abs(one - other)).item())  # pyright: ignore[reportArgumentType]
        for one, other in zip(fresh, reused, strict=True)
    )
    flipped = sum(
        int(mx.argmax(row, axis=-1).item() != token) for row, token in zip(reused, fresh_tokens, strict=True)
    )  # pyright: ignore[reportArgumentType]
    return {"reused_tokens": kept, "max_logprob_difference": difference, "tokens_flipped": flipped}


def gemm_rows() -> int:
    """The fewest rows whose GEMM no longer gives each row the bits of the row alone (0: never, to 32)."""
    weight = mx.random.normal((512, 256), key=mx.random.key(1))
    for rows in range(2, 33):
        inputs = mx.random.normal((rows, 256), key=mx.random.key(rows))
        together = inputs @ weight.T
        if any(
            not mx.array_equal(together[row : row + 1], inputs[row : row + 1] @ weight.T).item()
            for row in range(rows)
        ):
            return rows
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    steps = parser.parse_args().steps
    print(f"{datetime.date.today()}, {describe_machine()}, BLAS {BLAS.library}")
    print(f"float32 GEMM rows differ from the same row alone from {gemm_rows()} rows on (0: never up to 32)")
    for architecture, model in tiny_models().items():
        shard = load_shard(model, ShardSpec(start_layer=0, end_layer=N_LAYERS, n_layers=N_LAYERS))
        assert enable_row_attention(shard)
        tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
        prompts = [tokenizer.encode(text).ids for text in TEXTS]
        print(f"{architecture}: batching 8 x {steps} steps {batching(shard, prompts, steps)}")
        print(f"{architecture}: prefix reuse {prefix_reuse(shard, tokenizer, steps)}")


if __name__ == "__main__":
    main()
