"""Downloads from a local Hub: metadata, shard-only files, verification, and each failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from exo.inference.downloads import CorruptDownload, DiskFull, download_files, missing_files, remove_model
from exo.inference.hub import (
    HubAccessDenied,
    HubNotFound,
    HubOffline,
    HubSettings,
    HubUnreachable,
    fetch_hub_model,
)
from exo.inference.manifest import (
    HubFile,
    HubModel,
    Manifest,
    is_complete,
    needed_files,
    read_manifest,
    write_manifest,
)
from exo.inference.models import describe_model, get_model, list_models, read_model_info
from exo.inference.peer_files import FileRange, NotServed, ProgressCallback, fetch_from_peers, read_chunk
from tests.harness.hub_fixtures import publish, settings_for
from tests.harness.local_hub import LocalHub

REPO = "test-org/tiny-4"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    root = tmp_path / "hub"
    publish(root, REPO)
    with LocalHub(root, gated={"test-org/gated": "secret-token"}) as server:
        yield server


def _model(hub: LocalHub, tmp_path: Path, revision: str | None = None) -> object:
    return fetch_hub_model(REPO, revision, settings_for(hub.endpoint), tmp_path / "scratch")


def test_metadata_describes_the_model_without_fetching_weights(hub: LocalHub, tmp_path: Path) -> None:
    model = fetch_hub_model(REPO, None, settings_for(hub.endpoint), tmp_path / "scratch")
    weights = [hub_file for hub_file in model.files if hub_file.path.endswith(".safetensors")]
    assert len(weights) == 4 and all(hub_file.sha256 for hub_file in weights)
    assert model.commit == hub.commit(REPO)
    # Only headers were read from the weight files: far less than their size.
    weight_bytes = sum(hub_file.size for hub_file in weights)
    assert hub.stats.bytes_served < weight_bytes
    published = read_model_info(hub.root / REPO, REPO)
    described = describe_model(REPO, "", model.config, model.tensors)
    assert described.layer_bytes == published.layer_bytes
    assert described.total_weight_bytes == published.total_weight_bytes
    assert described.supported


def test_full_download_is_byte_identical_and_listed_under_the_repo_id(hub: LocalHub, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    seen: dict[str, tuple[int, int]] = {}
    folder = download_files(
        models_dir, model, needed_files(model), settings,
        progress=lambda path, done, total: seen.__setitem__(path, (done, total)),
    )  # fmt: skip
    assert folder == models_dir / "test-org" / "tiny-4"
    for hub_file in model.files:
        assert (folder / hub_file.path).read_bytes() == (hub.root / REPO / hub_file.path).read_bytes()
        assert seen[hub_file.path] == (hub_file.size, hub_file.size)
    assert [info.model_id for info in list_models(models_dir)] == [REPO]
    assert get_model(models_dir, REPO).supported
    assert is_complete(folder)
    assert not (models_dir / ".downloads" / REPO).exists()
    # Fetching again transfers nothing.
    served = hub.stats.bytes_served
    download_files(models_dir, model, needed_files(model), settings)
    assert hub.stats.bytes_served == served


def test_a_verified_file_a_kill_left_unlisted_is_kept_and_a_bad_one_fetched_again(
    hub: LocalHub, tmp_path: Path
) -> None:
    # A kill between a file's move into place and the manifest's write leaves it there unlisted:
    # it was verified before the move, so it is kept (not written again) and listed; one that no
    # longer has the Hub's sha256 is fetched again.
    models_dir = tmp_path / "models"
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    folder = download_files(models_dir, model, needed_files(model), settings)
    manifest = read_manifest(folder)
    assert manifest is not None
    weights = sorted(path for path in manifest.held if path.endswith(".safetensors"))
    kept, spoiled = weights[0], weights[1]
    unlisted = [path for path in manifest.held if path not in (kept, spoiled)]
    write_manifest(folder, Manifest(model, unlisted))
    (folder / spoiled).write_bytes(b"x" * model.file(spoiled).size)
    inode = (folder / kept).stat().st_ino
    assert {each.path for each in missing_files(models_dir, model, needed_files(model))} == {spoiled}
    download_files(models_dir, model, needed_files(model), settings)
    assert (folder / kept).stat().st_ino == inode
    assert (folder / spoiled).read_bytes() == (hub.root / REPO / spoiled).read_bytes()
    after = read_manifest(folder)
    assert after is not None and {kept, spoiled} <= set(after.held)


def test_a_stage_fetches_only_the_weight_files_of_its_layers(hub: LocalHub, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    first = needed_files(model, (0, 2))
    weights = sorted(hub_file.path for hub_file in first if hub_file.path.endswith(".safetensors"))
    assert weights == ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"]
    folder = download_files(models_dir, model, first, settings)
    assert not (folder / "model-00003-of-00004.safetensors").exists()
    # The partial folder still describes the whole model (from the manifest), but is not complete.
    info = get_model(models_dir, REPO)
    assert info.layer_bytes == read_model_info(hub.root / REPO, REPO).layer_bytes
    assert not is_complete(folder)
    last = needed_files(model, (2, 4))
    assert [hub_file.path for hub_file in missing_files(models_dir, model, last)] == [
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
    ]
    download_files(models_dir, model, last, settings)
    assert is_complete(folder)


def test_a_corrupt_transfer_is_fetched_again(hub: LocalHub, tmp_path: Path) -> None:
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    name = "model-00002-of-00004.safetensors"
    hub.corrupt_next.add(f"{REPO}/{name}")
    before = hub.stats.bytes_by_file[f"{REPO}/{name}"]  # its header, read for the metadata
    folder = download_files(tmp_path / "models", model, needed_files(model), settings)
    assert (folder / name).read_bytes() == (hub.root / REPO / name).read_bytes()
    assert hub.stats.bytes_by_file[f"{REPO}/{name}"] - before == 2 * model.file(name).size


def test_a_file_that_never_matches_its_sha256_is_refused_and_not_installed(
    hub: LocalHub, tmp_path: Path
) -> None:
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    name = "model-00003-of-00004.safetensors"
    path = hub.root / REPO / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the Hub's recorded sha256 no longer matches what it serves
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptDownload, match="sha256"):
        download_files(tmp_path / "models", model, needed_files(model), settings)
    assert list_models(tmp_path / "models") == []
    assert not (tmp_path / "models" / REPO / name).exists()


def test_disk_full_is_refused_before_fetching_naming_the_bytes(hub: LocalHub, tmp_path: Path) -> None:
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    served = hub.stats.bytes_served
    with pytest.raises(DiskFull) as refused:
        download_files(tmp_path / "models", model, needed_files(model), settings, free_bytes=lambda _: 1000)
    assert f"({model.total_bytes} bytes)" in refused.value.message
    assert "(1000 bytes) free" in refused.value.message
    assert hub.stats.bytes_served == served
    assert list_models(tmp_path / "models") == []


def test_gated_repos_say_so_and_name_hf_token(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    publish(root, "test-org/gated")
    with LocalHub(root, gated={"test-org/gated": "secret-token"}) as hub:
        with pytest.raises(HubAccessDenied, match=r"gated.*\(401\).*HF_TOKEN"):
            fetch_hub_model("test-org/gated", None, settings_for(hub.endpoint), tmp_path / "s")
        with pytest.raises(HubAccessDenied, match=r"\(403\).*HF_TOKEN"):
            fetch_hub_model("test-org/gated", None, settings_for(hub.endpoint, "wrong"), tmp_path / "s")
        settings = settings_for(hub.endpoint, "secret-token")
        model = fetch_hub_model("test-org/gated", None, settings, tmp_path / "s")
        download_files(tmp_path / "models", model, needed_files(model), settings)
        assert get_model(tmp_path / "models", "test-org/gated").supported


def test_missing_repos_and_revisions_are_404s(hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(HubNotFound, match="no model 'test-org/absent'"):
        fetch_hub_model("test-org/absent", None, settings_for(hub.endpoint), tmp_path / "s")
    with pytest.raises(HubNotFound, match="no revision 'v9'"):
        fetch_hub_model(REPO, "v9", settings_for(hub.endpoint), tmp_path / "s")
    # A commit hash is a revision too.
    assert fetch_hub_model(REPO, hub.commit(REPO), settings_for(hub.endpoint), tmp_path / "s").commit


def test_an_unreachable_hub_is_reported_as_such(tmp_path: Path) -> None:
    with pytest.raises(HubUnreachable, match=r"cannot reach the Hub at http://127\.0\.0\.1:9"):
        fetch_hub_model(REPO, None, settings_for("http://127.0.0.1:9"), tmp_path / "s")


def test_offline_mode_fetches_nothing(hub: LocalHub, tmp_path: Path) -> None:
    offline = HubSettings(hub.endpoint, None, offline=True)
    with pytest.raises(HubOffline, match="HF_HUB_OFFLINE"):
        fetch_hub_model(REPO, None, offline, tmp_path / "s")
    assert hub.stats.requests == []


def test_an_interrupted_download_resumes_from_the_bytes_it_has(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # huggingface_hub writes what it received in chunks of this size (10 MiB): smaller than the file.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    name = "model-00001-of-00004.safetensors"
    size = model.file(name).size
    only = [model.file("config.json"), model.file(name)]
    hub.cut_after_bytes = size // 2
    with pytest.raises(Exception):  # noqa: B017 (whatever the broken transfer raises)
        download_files(tmp_path / "models", model, only, settings)
    assert not (tmp_path / "models" / REPO / name).exists()
    before = hub.stats.bytes_by_file.get(f"{REPO}/{name}", 0)
    assert before <= size  # huggingface_hub's own retries resumed from the bytes they had
    hub.cut_after_bytes = None
    download_files(tmp_path / "models", model, only, settings)
    after = hub.stats.bytes_by_file[f"{REPO}/{name}"] - before
    assert after <= size - size // 2 + 16 * 1024  # at most one unwritten chunk is fetched twice
    assert (tmp_path / "models" / REPO / name).read_bytes() == (hub.root / REPO / name).read_bytes()


def test_config_json_is_written_from_the_description_not_fetched_again(hub: LocalHub, tmp_path: Path) -> None:
    """The node that read the metadata got config.json from the Hub; a node fetching the model
    with that description writes it from there (one Hub fetch of it per cluster), byte-identical.
    A description whose copy does not match the Hub's size fetches it from the Hub instead."""
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    config_key = f"{REPO}/config.json"
    assert hub.stats.whole_files[config_key] == 1  # the metadata read
    published = (hub.root / REPO / "config.json").read_bytes()
    folder = download_files(tmp_path / "models", model, needed_files(model), settings)
    assert (folder / "config.json").read_bytes() == published
    assert hub.stats.whole_files[config_key] == 1
    wrong = msgspec.structs.replace(model, config_text=model.config_text + " ")
    folder = download_files(tmp_path / "other", wrong, needed_files(wrong), settings)
    assert (folder / "config.json").read_bytes() == published
    assert hub.stats.whole_files[config_key] == 2


def test_remove_model_deletes_the_folder_and_its_staging(hub: LocalHub, tmp_path: Path) -> None:
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    models_dir = tmp_path / "models"
    download_files(models_dir, model, needed_files(model), settings)
    assert read_manifest(models_dir / REPO) is not None
    assert remove_model(models_dir, REPO)
    assert list_models(models_dir) == [] and not (models_dir / "test-org").exists()
    assert not remove_model(models_dir, REPO)


def test_files_come_from_peers_first_and_a_dying_peer_is_resumed_by_the_next(
    hub: LocalHub, tmp_path: Path
) -> None:
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    peer_dir = tmp_path / "peer"
    download_files(peer_dir, model, needed_files(model), settings)
    served_before = dict(hub.stats.whole_files)
    asked: list[tuple[str, int]] = []

    def ask(peer: str, wanted: FileRange) -> tuple[bytes, int] | None:
        asked.append((peer, wanted.offset))
        if peer == "dying" and wanted.offset > 0:
            return None  # it sent one chunk, then died
        small = FileRange(wanted.repo_id, wanted.commit, wanted.path, wanted.offset, 16 * 1024)
        return read_chunk(peer_dir, small)

    def source(model: HubModel, hub_file: HubFile, destination: Path, progress: ProgressCallback) -> bool:
        return fetch_from_peers(
            ["dying", "alive"], ask, model, hub_file, destination=destination, progress=progress
        )

    folder = download_files(tmp_path / "models", model, needed_files(model), settings, source=source)
    for hub_file in model.files:
        assert (folder / hub_file.path).read_bytes() == (hub.root / REPO / hub_file.path).read_bytes()
    assert hub.stats.whole_files == served_before  # nothing more from the Hub
    assert ("dying", 0) in asked and any(peer == "alive" and offset > 0 for peer, offset in asked)


def test_a_peer_serves_only_verified_files_of_the_commit_asked(hub: LocalHub, tmp_path: Path) -> None:
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    download_files(tmp_path / "peer", model, needed_files(model, (0, 1)), settings)
    name = "model-00001-of-00004.safetensors"
    data, size = read_chunk(tmp_path / "peer", FileRange(REPO, model.commit, name, 0, 10))
    assert len(data) == 10 and size == model.file(name).size
    with pytest.raises(NotServed):
        read_chunk(tmp_path / "peer", FileRange(REPO, "0" * 40, name, 0, 10))
    with pytest.raises(NotServed):
        read_chunk(
            tmp_path / "peer", FileRange(REPO, model.commit, "model-00004-of-00004.safetensors", 0, 10)
        )


def test_files_fetched_before_a_restart_are_not_fetched_again(hub: LocalHub, tmp_path: Path) -> None:
    settings = settings_for(hub.endpoint)
    model = fetch_hub_model(REPO, None, settings, tmp_path / "scratch")
    models_dir = tmp_path / "models"
    first = model.file("model-00001-of-00004.safetensors")
    staged = models_dir / ".downloads" / REPO / first.path
    staged.parent.mkdir(parents=True)
    staged.write_bytes((hub.root / REPO / first.path).read_bytes())  # as a killed run left it
    broken = models_dir / ".downloads" / REPO / "model-00002-of-00004.safetensors"
    broken.write_bytes(b"half")  # a wrong staged file is fetched again
    download_files(models_dir, model, needed_files(model), settings)
    assert hub.stats.whole_files.get(f"{REPO}/{first.path}", 0) == 0
    assert hub.stats.whole_files[f"{REPO}/model-00002-of-00004.safetensors"] == 1
    assert is_complete(models_dir / REPO)


def test_hand_placed_org_name_folders_are_models_and_ids_validate(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    publish(models_dir, "someone/hand-placed", shards=2)
    (models_dir / "someone" / "not-a-model").mkdir()
    (models_dir / ".downloads" / "x" / "y").mkdir(parents=True)
    assert [model.model_id for model in list_models(models_dir)] == ["someone/hand-placed"]
    assert get_model(models_dir, "someone/hand-placed@main").model_id == "someone/hand-placed@main"
    assert is_complete(models_dir / "someone" / "hand-placed")  # no manifest: whole as placed


def test_synthetic_shards_are_checked(tmp_path: Path) -> None:
    from exo.inference.synthetic import write_synthetic_model
    from tests.harness.hub_fixtures import SMALL_SPEC

    with pytest.raises(ValueError, match="shards"):
        write_synthetic_model(tmp_path / "m", SMALL_SPEC, shards=SMALL_SPEC.layers + 1)
