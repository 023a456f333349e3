"""`exo models pull|list|rm` without a node: straight to the models dir, from the (local) Hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from exo.node.main import main
from tests.harness.hub_fixtures import publish
from tests.harness.local_hub import LocalHub

REPO = "test-org/tiny-4"


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(["models", "--api-url", "http://127.0.0.1:9", *argv])
    return int(exited.value.code or 0)


def test_pull_list_rm_on_the_models_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(tmp_path / "hub", REPO)
    models = tmp_path / "models"
    with LocalHub(tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        assert run(["--models-dir", str(models), "pull", REPO]) == 0
        assert (models / REPO / "config.json").is_file()
        assert run(["--models-dir", str(models), "list"]) == 0
        listed = capsys.readouterr().out
        assert REPO in listed and "ready" in listed
        assert run(["--models-dir", str(models), "pull", "test-org/absent"]) == 1
        assert "no model 'test-org/absent'" in capsys.readouterr().err
        assert run(["--models-dir", str(models), "rm", REPO]) == 0
        assert not (models / REPO).exists()
        assert run(["--models-dir", str(models), "rm", REPO]) == 1
        assert run(["--models-dir", str(models), "pull", "not-a-repo"]) == 1
