"""A tensor rank's bound on a pass stuck in a collective (exo.inference.ring_watchdog): the
bound's setting, the watchdog thread, and a real mx.distributed ring whose peer is SIGSTOPped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from exo.inference.protocol import LoadShard, RingListening, RunnerFailed, RunnerStarted
from exo.inference.ring_watchdog import (
    DEFAULT_PASS_TIMEOUT,
    PassWatchdog,
    pass_timeout_from_environment,
    ring_endpoints,
)
from tests.harness.cluster_harness import free_port, wait_until
from tests.harness.inference_helpers import N_LAYERS, ControlServer, spawn_runner, stop_runners, tiny_models


def test_the_bound_comes_from_the_environment_and_bad_values_are_refused() -> None:
    assert pass_timeout_from_environment({}) == DEFAULT_PASS_TIMEOUT
    assert pass_timeout_from_environment({"EXO_TENSOR_PASS_TIMEOUT": " "}) == DEFAULT_PASS_TIMEOUT
    assert pass_timeout_from_environment({"EXO_TENSOR_PASS_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        with pytest.raises(ValueError, match="EXO_TENSOR_PASS_TIMEOUT must be"):
            pass_timeout_from_environment({"EXO_TENSOR_PASS_TIMEOUT": bad})


def test_ring_endpoints_are_this_ranks_port_and_the_others() -> None:
    hosts = ["10.0.0.1:4000", "10.0.0.2:4001", "::1:4002"]
    assert ring_endpoints(hosts, 1) == (4001, {("10.0.0.1", 4000), ("::1", 4002)})


def test_a_pass_past_the_bound_is_reported_then_cut_once() -> None:
    cuts: list[int] = []
    reasons: list[str] = []
    watchdog = PassWatchdog(0.2, 2, lambda: cuts.append(1) or 3, reasons.append)
    watchdog.start()
    try:
        watchdog.begin()
        wait_until(lambda: cuts, 10, "the watchdog cut the ring")
        watchdog.end()
    finally:
        watchdog.stop()
    assert cuts == [1] and reasons == [watchdog.fired]
    assert watchdog.fired is not None and watchdog.fired.startswith("tensor rank stalled")
    assert "rank 2's forward pass did not finish within 0.2 s" in watchdog.fired


_RANK = textwrap.dedent(
    """
    import json, os, signal
    import mlx.core as mx
    from exo.inference.ring_watchdog import PassWatchdog, cut_ring_connections, ring_endpoints
    rank = int(os.environ["MLX_RANK"])
    group = mx.distributed.init(strict=True, backend="ring")
    x = mx.ones((4096,))
    mx.eval(mx.distributed.all_sum(x, group=group))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen, its sockets open: no peer sees it go
    hosts = [entry[0] for entry in json.load(open(os.environ["MLX_HOSTFILE"]))]
    own_port, peers = ring_endpoints(hosts, rank)
    cut = []
    watchdog = PassWatchdog(1.0, rank, lambda: cut.append(cut_ring_connections(own_port, peers)) or cut[-1])
    watchdog.start()
    watchdog.begin()
    try:
        for _ in range(100):
            mx.eval(mx.distributed.all_sum(x, group=group))
        outcome = "finished"
    except RuntimeError as error:
        outcome = str(error)
    watchdog.end()
    print(json.dumps({"outcome": outcome, "cut": cut, "fired": watchdog.fired}), flush=True)
    """
)


def test_a_collective_blocked_on_a_stopped_peer_raises_once_the_watchdog_cuts_the_ring() -> None:
    with tempfile.TemporaryDirectory(prefix="exo-watchdog-") as folder:
        hostfile = Path(folder) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", _RANK],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)},
            )
            for rank in range(2)
        ]
        try:
            # Without the watchdog rank 0 would block in all_sum for ever: this would time out.
            output, errors = processes[0].communicate(timeout=120)
            wait_until(  # it stopped itself: /proc says T
                lambda: Path(f"/proc/{processes[1].pid}/stat").read_text().split(")")[1].split()[0] == "T",
                30,
                "rank 1 stopped",
            )
        finally:
            for process in processes:
                process.send_signal(signal.SIGKILL)  # SIGKILL ends a stopped process too
                process.wait()
    assert processes[0].returncode == 0, errors.decode()[-2000:]
    report = json.loads(output)
    assert report["outcome"] == "[ring] connection to a peer was lost"
    assert report["cut"] and report["cut"][0] >= 1
    assert report["fired"].startswith("tensor rank stalled")


def test_a_tensor_rank_refuses_a_bad_bound_before_it_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXO_TENSOR_PASS_TIMEOUT", "soon")  # the runner inherits it, as from its node
    control = ControlServer()
    runner = spawn_runner(control)
    try:
        control.receive(runner.runner_id, (RunnerStarted,))
        model = tiny_models()["llama"]
        control.send(
            runner.runner_id, LoadShard("i", "tiny", str(model), 0, N_LAYERS, N_LAYERS, rank=1, size=2)
        )
        failed = control.receive(runner.runner_id, (RunnerFailed, RingListening))
        assert isinstance(failed, RunnerFailed)
        assert failed.reason == "EXO_TENSOR_PASS_TIMEOUT must be a number of seconds, got 'soon'"
    finally:
        stop_runners(control, [runner])
        control.close()
