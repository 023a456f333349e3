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
    EXIT_RING_LOST,
    EXIT_STALLED,
    LOST_CHECK_AFTER,
    PassWatchdog,
    abandoned_exit,
    pass_timeout_from_environment,
    ring_endpoints,
)
from tests.harness.cluster_harness import free_port, wait_until
from tests.harness.inference_helpers import N_LAYERS, ControlServer, spawn_runner, stop_runners, tiny_models


def two_ranks(script: str, folder: Path) -> list[subprocess.Popen[bytes]]:
    """Rank 0 and rank 1 of a real mx.distributed ring on loopback, each running `script`."""
    hostfile = folder / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    return [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)},
        )
        for rank in range(2)
    ]


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


def test_a_lost_peer_is_noticed_once_a_pass_ran_a_second_and_a_pass_still_stuck_is_abandoned() -> None:
    abandoned: list[tuple[str, bool]] = []
    cuts: list[int] = []
    broken: list[str] = []
    watchdog = PassWatchdog(
        60.0,
        0,
        lambda: cuts.append(1) or 1,
        lost=lambda: broken[0] if broken else None,
        abandon=lambda reason, stalled: abandoned.append((reason, stalled)),
        grace=1.0,
    )
    watchdog.begin(now=100.0)
    broken.append("ring connection with 127.0.0.1:9 is CLOSE_WAIT (the peer closed it)")
    assert not watchdog.poll(100.0 + LOST_CHECK_AFTER / 2)  # a young pass is never checked
    assert watchdog.fired is None
    assert not watchdog.poll(102.0)
    assert watchdog.fired == f"tensor rank lost a peer: rank 0's {broken[0]}"
    assert not watchdog.poll(102.9) and not abandoned  # MLX may still raise in the pass: a grace
    assert watchdog.poll(103.1)
    assert abandoned == [(watchdog.fired, False)] and not cuts  # nothing to cut: the peer is gone


def test_a_pass_that_ends_after_the_ring_broke_is_not_abandoned() -> None:
    abandoned: list[tuple[str, bool]] = []
    watchdog = PassWatchdog(
        60.0,
        1,
        lambda: 0,
        lost=lambda: "1 of its 2 ring connections are gone",
        abandon=lambda *a: abandoned.append(a),
    )
    watchdog.begin(now=0.0)
    watchdog.poll(5.0)
    assert watchdog.fired is not None and not watchdog.stalled
    watchdog.end()  # MLX raised in the pass: the runner fails it and exits on its own
    assert not watchdog.poll(60.0) and not abandoned


def test_a_stalled_pass_still_stuck_after_the_cut_is_abandoned_as_a_stall() -> None:
    abandoned: list[tuple[str, bool]] = []
    reasons: list[str] = []
    watchdog = PassWatchdog(
        2.0,
        1,
        lambda: 2,
        reasons.append,
        lost=lambda: None,
        abandon=lambda *a: abandoned.append(a),
        grace=1.0,
    )
    watchdog.begin(now=0.0)
    watchdog.poll(1.5)
    assert watchdog.fired is None  # the ring is up and the pass is within its bound
    watchdog.poll(2.5)
    assert watchdog.stalled and reasons == [watchdog.fired]
    assert watchdog.poll(3.6)
    assert abandoned == [(watchdog.fired, True)]


def test_the_worker_reads_an_abandoning_runners_exit_code() -> None:
    assert abandoned_exit(EXIT_STALLED) == (
        "a tensor rank's pass stayed stuck after its watchdog cut a frozen peer's ring",
        "tensor_stall",  # the master re-places it, as for a stall the cut ended
    )
    stuck = abandoned_exit(EXIT_RING_LOST)
    assert stuck is not None and "peer rank's process died" in stuck[0] and stuck[1] is None
    assert abandoned_exit(1) is None and abandoned_exit(0) is None and abandoned_exit(-9) is None


# Each rank of a two-process ring (two_ranks): joined, its ring endpoints known, one all_sum done.
_RING_START = textwrap.dedent(
    """
    import json, os, signal
    import mlx.core as mx
    from exo.inference.ring_watchdog import (
        EXIT_RING_LOST, PassWatchdog, RingHealth, cut_ring_connections, ring_endpoints,
    )
    rank = int(os.environ["MLX_RANK"])
    group = mx.distributed.init(strict=True, backend="ring")
    hosts = [entry[0] for entry in json.load(open(os.environ["MLX_HOSTFILE"]))]
    own_port, peers = ring_endpoints(hosts, rank)
    x = mx.ones((4096,))
    mx.eval(mx.distributed.all_sum(x, group=group))
    """
)


_DIES = _RING_START + textwrap.dedent(
    """
    if rank == 1:
        for _ in range(3):
            mx.eval(mx.distributed.all_sum(x, group=group))
        os._exit(0)  # dies as a killed runner does: its ring sockets close
    health = RingHealth(own_port, peers)
    def abandon(reason, stalled):
        print(json.dumps({"reason": reason, "stalled": stalled, "expected": health.expected}), flush=True)
        os._exit(EXIT_RING_LOST)
    watchdog = PassWatchdog(60.0, rank, lambda: 0, lost=health.lost, abandon=abandon)
    watchdog.start()
    y = x
    for _ in range(200):  # a pass with many collectives queued, as a forward over many layers
        y = mx.distributed.all_sum(y, group=group) * 0.5
    watchdog.begin()
    try:
        mx.eval(y)
        print(json.dumps({"outcome": "finished"}), flush=True)
    except RuntimeError as error:
        print(json.dumps({"outcome": str(error)}), flush=True)
    """
)


def test_a_pass_left_stuck_by_a_dead_peer_is_abandoned_within_seconds() -> None:
    """MLX's ring socket threads exit after failing the collective in flight, so the pass's later
    all_sums wait forever (reproduced here without exo's runner): without the watchdog's ring
    check rank 0 would hang until this test's timeout."""
    with tempfile.TemporaryDirectory(prefix="exo-watchdog-") as folder:
        processes = two_ranks(_DIES, Path(folder))
        try:
            output, errors = processes[0].communicate(timeout=60)
        finally:
            for process in processes:
                process.kill()
                process.wait()
    report = json.loads(output.decode().strip().splitlines()[-1])
    if "outcome" in report:  # MLX raised in the pass: no hang to abandon, which is fine too
        assert report["outcome"] == "[ring] connection to a peer was lost", errors.decode()[-2000:]
        assert processes[0].returncode == 0
    else:
        assert processes[0].returncode == EXIT_RING_LOST, errors.decode()[-2000:]
        assert report["reason"].startswith("tensor rank lost a peer: rank 0's ring connection")
        assert report["stalled"] is False and report["expected"] >= 1


_RANK = _RING_START + textwrap.dedent(
    """
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen, its sockets open: no peer sees it go
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
        processes = two_ranks(_RANK, Path(folder))
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
