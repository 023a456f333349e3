"""A model's context length, from its config.json (ModelInfo does not carry it)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from exo.core.models import ModelInfo

# Where Hugging Face configs put the context length, most specific first.
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions")


def context_length(model: ModelInfo) -> int | None:
    """Tokens the model can attend to (prompt + completion); None when its config does not say."""
    return _read_context_length(model.path)


@functools.lru_cache(maxsize=256)
def _read_context_length(model_path: str) -> int | None:
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for key in _CONTEXT_KEYS:
        value = config.get(key)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
