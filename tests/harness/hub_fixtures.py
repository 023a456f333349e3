"""Synthetic models served by a LocalHub, shared by the Hub tests and the benchmark."""

from __future__ import annotations

import shutil
from pathlib import Path

from exo.inference.hub import HubSettings
from exo.inference.synthetic import SyntheticModelSpec, write_synthetic_model

SMALL_SPEC = SyntheticModelSpec(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=300)
_CACHE: dict[tuple[SyntheticModelSpec, int], Path] = {}


def publish(hub_root: Path, repo_id: str, spec: SyntheticModelSpec = SMALL_SPEC, shards: int = 4) -> Path:
    """Put a synthetic model at `hub_root/org/name` (made once per spec and copied)."""
    key = (spec, shards)
    made = _CACHE.get(key)
    if made is None or not made.exists():
        import tempfile

        made = write_synthetic_model(Path(tempfile.mkdtemp(prefix="exo-hub-model-")) / "m", spec, shards)
        _CACHE[key] = made
    target = hub_root / repo_id
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(made, target)
    return target


def settings_for(endpoint: str, token: str | None = None) -> HubSettings:
    return HubSettings(endpoint=endpoint, token=token, offline=False)
