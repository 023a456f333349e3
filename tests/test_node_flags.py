"""The node's command line: serving limits reach the runners it starts; bad values are refused."""

from __future__ import annotations

import pytest

from exo.api.body_limits import DEFAULT_MAX_BODY_BYTES
from exo.api.http_guard import connection_limit, default_max_connections, descriptor_budget
from exo.core.models import ModelInfo
from exo.inference.runner_options import parse_arguments as parse_runner_arguments
from exo.node.main import parse_args
from exo.node.worker import RunnerLimits, Worker


def no_model(model_id: str) -> ModelInfo:
    raise AssertionError(f"no model is looked up here ({model_id})")


def test_serving_limits_default_to_the_runners_own() -> None:
    config = parse_args([])
    assert config.runner_limits == RunnerLimits(weights_dtype="auto")
    worker = Worker("n", no_model, lambda events: None)
    worker.control_address = "tcp://127.0.0.1:5000"
    options = parse_runner_arguments(worker.runner_argv("r-1")[3:])
    assert (options.max_active_requests, options.max_waiting_requests) == (64, 64)
    assert (options.max_batch_size, options.prefix_cache_tokens) == (32, 8192)


def test_serving_limits_reach_the_runners_argv() -> None:
    limits = {"--max-active-requests": 2, "--max-waiting-requests": 0, "--max-batch-size": 1}
    limits["--prefix-cache-tokens"] = 0
    config = parse_args([str(item) for pair in limits.items() for item in pair])
    assert config.runner_limits == RunnerLimits(2, 0, 1, 0, "auto")
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


@pytest.mark.parametrize("weights_dtype", ["auto", "float32", "native"])
def test_weights_dtype_reaches_the_runners_argv(weights_dtype: str) -> None:
    config = parse_args(["--weights-dtype", weights_dtype])
    worker = Worker("n", no_model, lambda events: None, runner_limits=config.runner_limits)
    worker.control_address = "tcp://127.0.0.1:5000"
    assert parse_runner_arguments(worker.runner_argv("r-1")[3:]).weights_dtype == weights_dtype


def test_bad_weights_dtype_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--weights-dtype", "bfloat16"])
    assert "invalid choice: 'bfloat16'" in capsys.readouterr().err


def test_body_and_connection_limits_have_flags() -> None:
    config = parse_args([])
    assert config.max_body_bytes == DEFAULT_MAX_BODY_BYTES
    assert config.max_connections is None  # chosen at start from the descriptor limit
    config = parse_args(["--max-body-bytes", "1000", "--max-connections", "50"])
    assert (config.max_body_bytes, config.max_connections) == (1000, 50)
    for bad in (["--max-body-bytes", "0"], ["--max-connections", "-1"], ["--max-body-bytes", "4MB"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert 16 <= default_max_connections() <= 1000


def test_max_connections_never_exceeds_the_descriptor_budget() -> None:
    assert connection_limit(None) == default_max_connections()
    assert connection_limit(10) == 10
    assert connection_limit(10**9) == descriptor_budget() < 10**9


def test_metrics_public_is_off_unless_asked() -> None:
    assert parse_args([]).metrics_public is False
    assert parse_args(["--metrics-public"]).metrics_public is True


def test_a_bad_spare_runner_setting_stops_the_node_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXO_SPARE_RUNNER", "sometimes")
    with pytest.raises(SystemExit):
        parse_args([])
    assert "EXO_SPARE_RUNNER must be 1 or 0" in capsys.readouterr().err
    monkeypatch.setenv("EXO_SPARE_RUNNER", "0")
    parse_args([])
