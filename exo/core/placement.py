"""What a placement is: the stages it picked, or why none fits (exo.roles.placement decides)."""

from __future__ import annotations

import msgspec

from exo.core.events import ShardAssignment, Sharding
from exo.core.models import Representation


class Placement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A feasible placement. Both dicts are in pipeline order (first stage first)."""

    shard_assignments: dict[str, ShardAssignment]
    bytes_by_node: dict[str, int]
    weights: Representation | None = None  # the representation the bytes are of
    # Why the native representation was kept (`auto` with too little memory for float32), or "".
    weights_note: str = ""

    @property
    def node_ids(self) -> list[str]:
        return list(self.shard_assignments)


class NodeVerdict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One node's part in a refused placement: what it would have needed, or why it was left out."""

    node_id: str
    available_bytes: int
    needed_bytes: int
    shortfall_bytes: int
    reason: str


class PlacementRefusal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Why no placement exists: one line per cause, and the per-node detail behind them."""

    reasons: list[str]
    nodes: list[NodeVerdict]


class PlacementPreview(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a placement on exactly `n_nodes` nodes would look like, or why there is none."""

    n_nodes: int
    placement: Placement | None
    refusal: PlacementRefusal | None
    sharding: Sharding = "Pipeline"
