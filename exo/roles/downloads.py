"""What a node does about models it was asked to fetch or delete: a pure decision from the state.

`POST /models/download` and `DELETE /models/{id}` are requests in the log
(`ModelDownloadRequested`, `ModelRemovalRequested`, one per node); each node acts on its own.
A download the log shows as still `downloading` on this node, with none running here, was cut by
a restart: it is resumed (the files already fetched and the part files are kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from exo.core.events import InstanceCreated
from exo.core.messages import Placed, PlaceInstance, Refused
from exo.core.models import ModelFootprint
from exo.core.state import State
from exo.roles.commands import decide


@dataclass(frozen=True)
class FetchModel:
    model_id: str


@dataclass(frozen=True)
class RemoveModel:
    model_id: str
    request_id: str


ModelAction = FetchModel | RemoveModel


def plan_model_actions(state: State, node_id: str, running: set[str]) -> list[ModelAction]:
    """Downloads to start and removals to carry out on `node_id`; `running`: model ids this node
    is already fetching or removing."""
    actions: list[ModelAction] = []
    for model_id, download in sorted(state.downloads.get(node_id, {}).items()):
        if model_id in running:
            continue
        if download.status == "requested" or (download.status == "downloading" and download.whole):
            actions.append(FetchModel(model_id))
        elif download.status == "removing":
            actions.append(RemoveModel(model_id, download.request_id))
    return actions


def instances_using(state: State, model_id: str) -> list[str]:
    """Instances of the model (any revision of the repo): its files may not be deleted under them."""
    repo_id = model_id.split("@", 1)[0]
    return sorted(
        instance.instance_id
        for instance in state.instances.values()
        if instance.model_id.split("@", 1)[0] == repo_id
    )


def holders(state: State, model_id: str) -> list[str]:
    """Nodes the log says hold (or are fetching) files of the model."""
    repo_id = model_id.split("@", 1)[0]
    return sorted(
        node_id
        for node_id, models in state.downloads.items()
        if repo_id in models and models[repo_id].status != "removed"
    )


def default_download_nodes(
    state: State, model_id: str, footprint: ModelFootprint, nodes_with_model: Mapping[str, set[str]]
) -> list[str] | Refused:
    """The nodes `POST /models/download` fetches to when none are named: those `place_instance`
    of the model would choose (the master's own decision on the same footprint, holders first,
    memory promised to loading instances kept), so a download lands where the model will run.
    `footprint` is the asking node's, at the representation its runners hold (`--weights-dtype`)."""
    outcome = decide(PlaceInstance(model_id, footprint, download=True), state, nodes_with_model, "download")
    match outcome.answer:
        case Placed():
            [created] = [event for event in outcome.events if isinstance(event, InstanceCreated)]
            return list(created.shard_assignments)
        case Refused() as refused:
            return refused
        case other:
            raise AssertionError(f"unexpected answer to a placement: {type(other).__name__}")


def hub_fetcher(state: State, repo_id: str, path: str) -> str | None:
    """The node that fetches `path` of the model from the Hub for the whole cluster: of the alive
    nodes whose download in progress lacks it, the one whose download started first in the log.
    The others copy it from that node once it holds it. Every node decides the same from the
    log, and a node only ever waits for one that started earlier, so no two wait for each other.
    None: no download in progress lists the file."""
    first: tuple[int, str] | None = None
    for node_id, models in state.downloads.items():
        download = models.get(repo_id)
        node = state.nodes.get(node_id)
        if download is None or download.status != "downloading" or path not in download.files:
            continue
        if node is None or node.status != "alive":
            continue
        if first is None or (download.since, node_id) < first:
            first = (download.since, node_id)
    return first[1] if first is not None else None
