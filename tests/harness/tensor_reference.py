"""mlx-lm's own tensor-parallel run, the reference a tensor instance must equal.

N processes started the way `mlx.launch --backend ring` starts them (a hostfile of one HOST:PORT
per rank in MLX_HOSTFILE, MLX_RANK each), each loading with `mlx_lm.utils.sharded_load`
(`model.shard(group)`) and generating greedily with `mlx_lm.generate`; rank 0 reports the texts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from tests.harness.cluster_harness import free_port

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from exo.inference.blas import load_optimized_blas
    load_optimized_blas()
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.utils import sharded_load
    request = json.loads(open(sys.argv[1]).read())
    group = mx.distributed.init(strict=True, backend="ring")
    model, tokenizer = sharded_load(request["model"], tensor_group=group)
    if request["upcast"]:  # what exo holds on the CPU: bf16 and quantization scales widened
        model.set_dtype(mx.float32)
    texts = []
    for messages in request["conversations"]:
        prompt = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        texts.append(mlx_lm.generate(model, tokenizer, prompt, max_tokens=request["max_tokens"]))
    if group.rank() == 0:
        json.dump({"texts": texts}, sys.stdout)
    """
)


def mlx_lm_tensor_texts(
    model: Path,
    conversations: list[list[dict[str, Any]]],
    max_tokens: int,
    ranks: int = 2,
    upcast: bool = False,
) -> list[str]:
    """Rank 0's greedy texts; `upcast` widens every floating array to float32 after the load
    (`set_dtype`, as exo's `--weights-dtype auto` holds a bfloat16 or quantized checkpoint on a CPU)."""
    request = {
        "model": str(model),
        "conversations": conversations,
        "max_tokens": max_tokens,
        "upcast": upcast,
    }
    with tempfile.TemporaryDirectory(prefix="exo-mlx-ring-") as folder:
        request_file = Path(folder) / "request.json"
        request_file.write_text(json.dumps(request))
        hostfile = Path(folder) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)]))
        processes = []
        for rank in range(ranks):
            environment = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)}
            process = subprocess.Popen(
                [sys.executable, "-c", _SCRIPT, str(request_file)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environment,
            )
            processes.append(process)
        # Every rank runs at once (each waits for the others in the ring's init); read them in turn.
        try:
            outputs = [process.communicate(timeout=120) for process in processes]
        finally:
            for process in processes:
                process.kill()
    for process, (_, error) in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"mlx-lm tensor-parallel rank failed: {error.decode()[-2000:]}")
    return list(json.loads(outputs[0][0])["texts"])
