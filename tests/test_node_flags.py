"""The node's command line: serving limits reach the runners it starts; bad values are refused."""

from __future__ import annotations

import pytest

from exo.core.models import ModelInfo
from exo.inference.runner_options import parse_arguments as parse_runner_arguments
from exo.node.main import parse_args
from exo.node.worker import RunnerLimits, Worker


def no_model(model_id: str) -> ModelInfo:
    raise AssertionError(f"no model is looked up here ({model_id})")


def test_serving_limits_default_to_the_runners_own() -> None:
    config = parse_args([])
    assert config.runner_limits == RunnerLimits()
    worker = Worker("n", no_model, lambda events: None)
    worker.control_address = "tcp://127.0.0.1:5000"
    options = parse_runner_arguments(worker.runner_argv("r-1")[3:])
    assert (options.max_active_requests, options.max_waiting_requests) == (64, 64)
    assert (options.max_batch_size, options.prefix_cache_tokens) == (32, 8192)


def test_serving_limits_reach_the_runners_argv() -> None:
    limits = {"--max-active-requests": 2, "--max-waiting-requests": 0, "--max-batch-size": 1}
    limits["--prefix-cache-tokens"] = 0
    config = parse_args([str(item) for pair in limits.items() for item in pair])
    assert config.runner_limits == RunnerLimits(2, 0, 1, 0)
    worker = Worker("n", no_model, lambda events: None, runner_limits=config.runner_limits)
    worker.control_address = "tcp://127.0.0.1:5000"
    options = parse_runner_arguments(worker.runner_argv("r-1")[3:])
    assert (options.max_active_requests, options.max_waiting_requests) == (2, 0)
    assert (options.max_batch_size, options.prefix_cache_tokens) == (1, 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-active-requests", "0"], "--max-active-requests must be at least 1"),
        (["--max-batch-size", "-1"], "--max-batch-size must be at least 1"),
        (["--max-waiting-requests", "-1"], "--max-waiting-requests cannot be negative"),
        (["--prefix-cache-tokens", "-5"], "--prefix-cache-tokens cannot be negative"),
        (["--max-batch-size", "many"], "invalid int value"),
    ],
)
def test_bad_serving_limits_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_metrics_public_is_off_unless_asked() -> None:
    assert parse_args([]).metrics_public is False
    assert parse_args(["--metrics-public"]).metrics_public is True
