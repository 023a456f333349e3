"""The runner's command line: its options, the argv a worker starts it with, and parsing."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

import msgspec

from exo.inference.weights import WEIGHTS_DTYPES, WeightsDtype

DESCRIPTION = (
    "A pipeline stage: loads one shard when its worker says so and serves pipeline frames. "
    "The first stage's admission, batching and prefix cache settings decide for the instance."
)


# A runner started with this flag is a node's warm spare (exo/node/spare_runner.py): it imports
# what loading needs, then reads its runner id from stdin (end of input: it exits).
SPARE_FLAG = "--spare"


class RunnerOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    control: str
    runner_id: str
    activation_host: str = "127.0.0.1"
    advertise_host: str | None = None
    threads: int | None = None
    batch_threads: int = 1
    prefill_step_size: int = 2048
    max_active_requests: int = 64
    max_waiting_requests: int = 64
    max_batch_size: int = 32
    prefix_cache_tokens: int = 8192
    retry_after: float = 1.0
    send_timeout: float = 2.0
    heartbeat_interval: float = 1.0
    stats_interval: float = 2.0
    weights_dtype: WeightsDtype = "auto"


# The serving limits a node passes on to its runners (`exo --max-active-requests ...`), and the
# least each may be: the node and the runner check them alike.
SERVING_LIMIT_MINIMUMS = {
    "max_active_requests": 1,
    "max_waiting_requests": 0,
    "max_batch_size": 1,
    "prefix_cache_tokens": 0,
}


def serving_limit_problems(values: Mapping[str, object]) -> list[str]:
    """What is wrong with the serving limits in `values` (argparse's namespace as a dict)."""
    problems: list[str] = []
    for name, least in SERVING_LIMIT_MINIMUMS.items():
        value = values.get(name)
        if isinstance(value, int) and value < least:
            flag = "--" + name.replace("_", "-")
            problems.append(f"{flag} must be at least {least}" if least else f"{flag} cannot be negative")
    return problems


def runner_command(
    control: str,
    runner_id: str,
    *,
    activation_host: str = "127.0.0.1",
    advertise_host: str | None = None,
    threads: int | None = None,
    batch_threads: int | None = None,
    max_active_requests: int | None = None,
    max_waiting_requests: int | None = None,
    max_batch_size: int | None = None,
    prefix_cache_tokens: int | None = None,
    weights_dtype: WeightsDtype | None = None,
) -> list[str]:
    """The argv a worker starts a runner with (the same interpreter as the caller); None leaves
    the runner's default."""
    command = [sys.executable, "-m", "exo.inference.runner", "--control", control, "--runner-id", runner_id]
    command += ["--activation-host", activation_host]
    if advertise_host is not None:
        command += ["--advertise-host", advertise_host]
    optional = {
        "--threads": threads,
        "--batch-threads": batch_threads,
        "--max-active-requests": max_active_requests,
        "--max-waiting-requests": max_waiting_requests,
        "--max-batch-size": max_batch_size,
        "--prefix-cache-tokens": prefix_cache_tokens,
        "--weights-dtype": weights_dtype,
    }
    for flag, value in optional.items():
        if value is not None:
            command += [flag, str(value)]
    return command


def parse_arguments(argv: list[str] | None = None) -> RunnerOptions:
    parser = argparse.ArgumentParser(prog="python -m exo.inference.runner", description=DESCRIPTION)
    parser.add_argument("--control", required=True, help="the worker's ROUTER address, tcp://HOST:PORT")
    parser.add_argument("--runner-id", default=None, help="routing id on the control channel")
    parser.add_argument("--activation-host", default="127.0.0.1", help="interface for the activation PULL")
    parser.add_argument("--advertise-host", default=None, help="host peers use to reach it (default: bound)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: usable cores)")
    parser.add_argument(
        "--batch-threads",
        type=int,
        default=1,
        help="BLAS threads for a pass of several requests' single-token steps (default 1)",
    )
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--max-active-requests", type=int, default=64, help="requests served at once")
    parser.add_argument(
        "--max-waiting-requests", type=int, default=64, help="requests queued beyond those; more are refused"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="requests' steps in one pass (1: none)"
    )
    parser.add_argument(
        "--prefix-cache-tokens", type=int, default=8192, help="tokens of finished requests' KV kept (0: off)"
    )
    parser.add_argument("--retry-after", type=float, default=1.0, help="seconds a refused requester waits")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--stats-interval", type=float, default=2.0)
    parser.add_argument(
        "--weights-dtype",
        choices=WEIGHTS_DTYPES,
        default="auto",
        help="hold weights as float32 (upcast, dequantized) or as the checkpoint has them; "
        "auto: float32 on MLX's CPU backend unless placement kept the native representation",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    arguments = parser.parse_args(argv)
    if arguments.activation_host in ("0.0.0.0", "*", "::") and not arguments.advertise_host:
        parser.error("--advertise-host is required when binding every interface")
    if min(arguments.prefill_step_size, arguments.batch_threads) < 1 or (
        arguments.threads is not None and arguments.threads < 1
    ):
        parser.error("--prefill-step-size, --threads and --batch-threads must be positive")
    if arguments.retry_after < 0:
        parser.error("--retry-after cannot be negative")
    if problems := serving_limit_problems(vars(arguments)):
        parser.error("; ".join(problems))
    logging.basicConfig(level=logging.DEBUG if arguments.verbose else logging.WARNING)
    return RunnerOptions(
        control=arguments.control,
        runner_id=arguments.runner_id or f"runner-{os.getpid()}",
        activation_host=arguments.activation_host,
        advertise_host=arguments.advertise_host,
        threads=arguments.threads,
        batch_threads=arguments.batch_threads,
        prefill_step_size=arguments.prefill_step_size,
        max_active_requests=arguments.max_active_requests,
        max_waiting_requests=arguments.max_waiting_requests,
        max_batch_size=arguments.max_batch_size,
        prefix_cache_tokens=arguments.prefix_cache_tokens,
        retry_after=arguments.retry_after,
        heartbeat_interval=arguments.heartbeat_interval,
        stats_interval=arguments.stats_interval,
        weights_dtype=arguments.weights_dtype,
    )
