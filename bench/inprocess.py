"""mlx-lm `stream_generate` in its own process: the in-process baseline of the suite.

    python -m bench.inprocess MODEL_DIR        (EXO_BLAS=reference for the reference BLAS)

Loads the model once, then reads one JSON request per stdin line and answers one JSON line:
request {"messages": [...]} or {"prompt_tokens": [...]}, with "max_tokens" and "logit_bias"
({token id: bias}, as the HTTP requests send, so both sides compute the same thing); answer
{"ttft", "decode_tps", "tokens", "prompt_tokens", "blas"} or {"error": "..."}. Its own process so
it gets its own BLAS choice, made before mlx is imported.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main() -> None:
    from exo.inference.blas import load_optimized_blas

    blas = load_optimized_blas()
    import mlx_lm
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, tokenizer = mlx_lm.load(sys.argv[1])[:2]
    print(json.dumps({"ready": True, "blas": blas.library}), flush=True)
    for line in sys.stdin:
        request: dict[str, Any] = json.loads(line)
        if "messages" in request:
            prompt = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True)
        else:
            prompt = request["prompt_tokens"]
        bias = {int(token): float(value) for token, value in request.get("logit_bias", {}).items()}
        started = time.perf_counter()
        stamps: list[float] = []
        for _ in mlx_lm.stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=int(request["max_tokens"]),
            sampler=make_sampler(0.0),
            logits_processors=make_logits_processors(logit_bias=bias or None),
        ):
            stamps.append(time.perf_counter())
        if len(stamps) < 2:
            print(json.dumps({"error": f"only {len(stamps)} tokens generated"}), flush=True)
            continue
        answer = {
            "ttft": stamps[0] - started,
            "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "tokens": len(stamps),
            "prompt_tokens": len(prompt),
            "blas": blas.library,
        }
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
