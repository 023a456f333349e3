"""The log's side of downloads: state folding, what a node acts on, and placement preferring holders."""

from __future__ import annotations

import msgspec

from exo.core.events import (
    Event,
    IndexedEvent,
    InstanceCreated,
    ModelDownloadFailed,
    ModelDownloadFinished,
    ModelDownloadRequested,
    ModelDownloadStarted,
    ModelRemovalRequested,
    ModelRemoved,
    NodeJoined,
    NodeTimedOut,
    RunnerStatusUpdated,
    ShardAssignment,
    decode_event,
    encode_event,
)
from exo.core.messages import Placed, PlaceInstance, Refused
from exo.core.models import ModelFootprint
from exo.core.state import ModelDownload, State, apply, decode_state, encode_state
from exo.roles.commands import decide
from exo.roles.downloads import (
    FetchModel,
    RemoveModel,
    holders,
    hub_fetcher,
    instances_using,
    plan_model_actions,
)

GIB = 1024**3
REPO = "org/model"


def fold(*events: Event, state: State | None = None) -> State:
    state = state or State()
    for event in events:
        state = apply(state, IndexedEvent(state.last_event_index + 1, 1, "n", 0, event))
    return state


def test_download_events_fold_into_each_nodes_record_and_survive_a_snapshot() -> None:
    state = fold(
        ModelDownloadRequested("a", REPO),
        ModelDownloadStarted("a", REPO, 100),
        ModelDownloadStarted("b", REPO, 40, whole=False),
        ModelDownloadFinished("b", REPO, 40, whole=False),
        ModelDownloadFailed("a", REPO, "disk full"),
    )
    assert state.downloads == {
        "a": {REPO: ModelDownload("failed", reason="disk full")},
        "b": {REPO: ModelDownload("ready", 40, whole=False)},
    }
    assert fold(ModelDownloadStarted("a", REPO, 9, files=["x"])).downloads["a"][REPO] == ModelDownload(
        "downloading", 9, files=["x"], since=1
    )
    assert decode_state(encode_state(state)) == state
    assert holders(state, REPO) == ["a", "b"]
    removed = fold(
        ModelRemovalRequested("b", REPO, "r1"), ModelRemoved("b", REPO, request_id="r1"), state=state
    )
    assert removed.downloads["b"][REPO] == ModelDownload("removed", request_id="r1")
    assert holders(removed, REPO) == ["a"]


def test_old_events_decode_unchanged_and_new_ones_round_trip() -> None:
    old = RunnerStatusUpdated("i", "a", "ready", activation_address="tcp://x:1")
    assert decode_event(encode_event(old)) == old
    # A start written before `files` existed decodes with none.
    written_before = {"type": "ModelDownloadStarted", "node_id": "a", "model_id": REPO, "bytes_total": 1}
    assert decode_event(msgspec.msgpack.encode(written_before)) == ModelDownloadStarted("a", REPO, 1)
    started = ModelDownloadStarted("a", REPO, 1, files=["model.safetensors"])
    for event in (started, ModelRemoved("a", REPO, had_files=False)):
        assert decode_event(encode_event(event)) == event


def test_a_node_acts_on_its_own_requests_and_resumes_only_whole_downloads() -> None:
    state = fold(
        ModelDownloadRequested("a", "org/one"),
        ModelDownloadStarted("a", "org/two", 10),  # whole: cut by a restart, resumed
        ModelDownloadStarted("a", "org/three", 10, whole=False),  # a stage's: its runner redoes it
        ModelRemovalRequested("a", "org/four", "r"),
        ModelDownloadFinished("a", "org/five", 10),
        ModelDownloadRequested("b", "org/six"),
    )
    assert plan_model_actions(state, "a", set()) == [
        RemoveModel("org/four", "r"),
        FetchModel("org/one"),
        FetchModel("org/two"),
    ]
    assert plan_model_actions(state, "a", {"org/one", "org/two", "org/four"}) == []


def test_a_downloading_stage_makes_the_instance_downloading_then_loading() -> None:
    assignments = {"a": ShardAssignment(0, 2, 4), "b": ShardAssignment(2, 4, 4)}
    state = fold(
        InstanceCreated("i", REPO, "Pipeline", assignments), RunnerStatusUpdated("i", "b", "downloading")
    )
    assert state.instances["i"].status == "downloading"
    assert instances_using(state, f"{REPO}@main") == ["i"]
    state = fold(RunnerStatusUpdated("i", "b", "loading"), state=state)
    assert state.instances["i"].status == "loading"


def test_placing_a_download_prefers_the_nodes_that_hold_the_model() -> None:
    state = fold(
        NodeJoined("a", "a:1", 64 * GIB, 60 * GIB),
        NodeJoined("b", "b:1", 64 * GIB, 50 * GIB),
        NodeJoined("c", "c:1", 64 * GIB, 40 * GIB),
    )
    footprint = ModelFootprint.uniform(4, GIB)
    command = PlaceInstance(REPO, footprint, download=True)
    # "c" holds the model: it is chosen though "a" has more memory.
    placed = decide(command, state, {REPO: {"c"}}, "i-1")
    assert placed.answer == Placed("i-1")
    [created] = placed.events
    assert isinstance(created, InstanceCreated) and list(created.shard_assignments) == ["c"]
    # No holder: the usual placement over every alive node.
    anywhere = decide(command, state, {}, "i-2")
    assert anywhere.answer == Placed("i-2")
    # Without `download` a model no node holds is refused, as before.
    refused = decide(PlaceInstance(REPO, footprint), state, {}, "i-3").answer
    assert isinstance(refused, Refused) and refused.reason == "model_not_held"


def test_the_node_whose_download_started_first_fetches_a_shared_file_from_the_hub() -> None:
    """One Hub download per file: of the alive nodes whose download lacks a file, the one that
    started first in the log fetches it; a restart keeps its place; a dead node loses it."""
    joined = fold(*(NodeJoined(node_id, f"{node_id}:1", GIB, GIB) for node_id in "abc"))
    state = fold(
        ModelDownloadStarted("c", REPO, 30, files=["w1", "w2", "config.json"]),
        ModelDownloadStarted("a", REPO, 30, files=["w1", "w2", "w3", "config.json"]),
        ModelDownloadStarted("b", REPO, 30, whole=False, files=["w3"]),
        state=joined,
    )
    # "c" started first: it fetches what it lacks; "a" is first among those lacking w3.
    assert [hub_fetcher(state, REPO, path) for path in ("w1", "w2", "w3", "config.json")] == [
        "c",
        "c",
        "a",
        "c",
    ]
    assert hub_fetcher(state, REPO, "tokenizer.json") is None
    assert hub_fetcher(state, "org/other", "w1") is None
    # "c" restarted and starts again (with fewer files left): it keeps its place in line.
    again = fold(ModelDownloadStarted("c", REPO, 30, files=["w2", "config.json"]), state=state)
    assert again.downloads["c"][REPO].since == state.downloads["c"][REPO].since
    assert [hub_fetcher(again, REPO, path) for path in ("w1", "w2")] == ["a", "c"]
    # "c" is gone (or failed, or finished): the next in line fetches from the Hub.
    gone = fold(NodeTimedOut("c"), state=state)
    assert hub_fetcher(gone, REPO, "w1") == "a"
    finished = fold(ModelDownloadFinished("c", REPO, 30), state=state)
    assert hub_fetcher(finished, REPO, "w1") == "a"
