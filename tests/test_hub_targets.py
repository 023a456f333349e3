"""Where a Hub model goes before anything is fetched: the nodes `POST /models/download` picks and
the placements `GET /instance/previews` shows come from the Hub's metadata, sized at the
representation the node's runners hold (`--weights-dtype`), as `place_instance` sizes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exo.core.events import Event, IndexedEvent, NodeJoined
from exo.core.messages import Refused
from exo.core.models import ModelFootprint, ModelInfo, WeightBytes
from exo.core.state import State, apply
from exo.node.hub_services import HubModels
from exo.roles.downloads import default_download_nodes

MIB = 1024**2
REPO = "org/model"


def model_info() -> ModelInfo:
    """A bfloat16 checkpoint of 20 MiB whose float32 copy (what a CPU runner holds) is 40 MiB."""
    return ModelInfo(
        model_id=REPO, path="", architecture="llama", n_layers=4, hidden_size=64, vocab_size=300,
        dtype="bfloat16", total_weight_bytes=20 * MIB, layer_bytes=[4 * MIB] * 4, embedding_bytes=2 * MIB,
        head_bytes=2 * MIB, other_bytes=0, tied_embeddings=False, supported=True, reason="",
        float32=WeightBytes([8 * MIB] * 4, 4 * MIB, 4 * MIB, 0),
    )  # fmt: skip


def cluster_state() -> State:
    state = State()
    joined: list[Event] = [
        NodeJoined("a", "a:1", 128 * MIB, 30 * MIB),
        NodeJoined("b", "b:1", 128 * MIB, 26 * MIB),
        NodeJoined("c", "c:1", 128 * MIB, 22 * MIB),
    ]
    for event in joined:
        state = apply(state, IndexedEvent(state.last_event_index + 1, 1, "a", 0, event))
    return state


@dataclass
class FakeMember:
    node_id: str
    state: State
    heartbeats: dict[str, object] = field(default_factory=dict[str, object])
    submitted: list[Event] = field(default_factory=list[Event])

    def submit(self, events: list[Event]) -> None:
        self.submitted.extend(events)


class FakeFetcher:
    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.source: object = None
        self.ask_peers: object = None

    async def describe(self, model_id: str) -> ModelInfo:
        return model_info()


def test_default_download_nodes_are_place_instances_choice() -> None:
    state = cluster_state()
    native = ModelFootprint.of_model(model_info(), "native")
    wide = ModelFootprint.of_model(model_info(), "float32")
    assert default_download_nodes(state, REPO, native, {}) == ["a"]
    assert default_download_nodes(state, REPO, wide, {}) == ["a", "b"]
    # A node holding the model is chosen first, as place_instance does.
    assert default_download_nodes(state, REPO, native, {REPO: {"c"}}) == ["c"]
    refused = default_download_nodes(state, REPO, ModelFootprint.uniform(4, 100 * MIB), {})
    assert isinstance(refused, Refused) and "cannot place" in (refused.detail or "")


async def test_a_download_goes_to_the_nodes_its_float32_footprint_needs(tmp_path: Path) -> None:
    """A node running `--weights-dtype float32` sizes the download as its runners will hold it:
    the 40 MiB float32 copy needs two nodes where the 20 MiB file fits on one."""
    member = FakeMember("a", cluster_state())
    hub = HubModels(
        member,  # type: ignore[arg-type]
        FakeFetcher(tmp_path),  # type: ignore[arg-type]
        local_models=list,
        footprint_of_model=lambda model: ModelFootprint.of_model(model, "float32"),
    )
    assert await hub.download_model(REPO, None) == ["a", "b"]
    assert [(event.node_id, event.model_id) for event in member.submitted] == [("a", REPO), ("b", REPO)]  # type: ignore[attr-defined]


async def test_previews_of_a_hub_model_no_node_holds_come_from_its_metadata(tmp_path: Path) -> None:
    """`GET /instance/previews` of a Hub id answers from the Hub's description (it used to be a
    404 until some node held the files), at the node's `--weights-dtype` like place_instance."""
    from exo.node.api_adapter import ClusterServices, ModelCatalog

    member = FakeMember("a", cluster_state())
    hub = HubModels(member, FakeFetcher(tmp_path), local_models=list)  # type: ignore[arg-type]
    services = ClusterServices(
        member,  # type: ignore[arg-type]
        ModelCatalog(tmp_path, "float32"),
        None,  # type: ignore[arg-type]
        hub=hub,
    )
    pipeline = [each for each in await services.previews(REPO) if each.sharding == "Pipeline"]
    one, two, three = pipeline
    assert one.placement is None and one.refusal is not None  # 40 MiB of float32 on 30 MiB
    assert two.placement is not None and sorted(two.placement.shard_assignments) == ["a", "b"]
    assert two.placement.weights == "float32"
    assert three.placement is not None
