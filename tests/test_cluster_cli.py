"""`exo cluster ...` on bad input (the end-to-end removal is in tests/test_cluster.py)."""

from __future__ import annotations

import pytest

from exo.node import main as exo_main
from exo.node.cluster_cli import main
from tests.harness.cluster_harness import free_port


def test_an_unreachable_node_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["remove", "node1", "--api-url", url]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"exo cluster remove: cannot reach {url}") and error.count("\n") == 1


@pytest.mark.parametrize("argv", [[], ["remove"], ["forget", "node1"]])
def test_a_missing_or_unknown_subcommand_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2


def test_the_exo_script_dispatches_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        exo_main(["cluster", "remove", "node1", "--api", f"http://127.0.0.1:{free_port()}"])
    assert exited.value.code == 1
    assert "cannot reach" in capsys.readouterr().err
