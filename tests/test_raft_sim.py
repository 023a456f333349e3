"""The deterministic simulator over many seeds (tests/harness/sim.py).

EXO_SIM_SEEDS sets how many seeds run (default 2000, about 20 s of CPU);
EXO_SIM_SEED=N runs only seed N, which replays exactly: `python -m tests.harness.sim N -v` prints
its trace.
"""

from __future__ import annotations

import os
import subprocess
import sys

from exo.roles.raft import Raft, Send
from tests.harness.sim import Simulation, Violation, run_seed

SEEDS = int(os.environ.get("EXO_SIM_SEEDS", "2000"))


def _seeds() -> range:
    only = os.environ.get("EXO_SIM_SEED")
    return range(int(only), int(only) + 1) if only else range(SEEDS)


def test_every_seed_keeps_the_invariants() -> None:
    failures: list[str] = []
    faults = writes = 0
    for seed in _seeds():
        try:
            simulation = run_seed(seed)
        except AssertionError as error:  # a Violation, or a safety assertion inside the core
            failures.append(f"seed {seed}: {error} (replay: EXO_SIM_SEED={seed})")
            continue
        faults += simulation.faults.total
        writes += len(simulation.acknowledged)
    count = len(_seeds())
    print(
        f"\n{count} seeds, {faults / count:.1f} faults and {writes / count:.1f} acknowledged writes per seed"
    )
    assert not failures, "\n".join(failures[:20])


def test_a_seed_replays_exactly() -> None:
    first, second = Simulation(1234), Simulation(1234)
    first.run()
    second.run()
    assert first.steps == second.steps
    assert first.acknowledged == second.acknowledged
    assert first.nodes["n0"].raft.log == second.nodes["n0"].raft.log


def test_a_seed_replays_exactly_in_another_process() -> None:
    """Nothing depends on the process: set order follows PYTHONHASHSEED, so two hash seeds must agree."""
    outputs = []
    for hash_seed in ("1", "2"):
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed}
        command = [sys.executable, "-m", "tests.harness.sim", "480", "1821", "-v"]
        result = subprocess.run(
            command, capture_output=True, text=True, env=environment, timeout=120, check=True
        )
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    assert "seed 480: " in outputs[0]


def test_the_simulation_injects_faults_and_elections() -> None:
    """Not vacuous: seeds crash, pause and partition nodes, elect several leaders, acknowledge writes."""
    simulations = [run_seed(seed) for seed in range(40)]
    assert sum(s.faults.crashes for s in simulations) > 0
    assert sum(s.faults.partitions for s in simulations) > 0
    assert sum(s.faults.pauses for s in simulations) > 0
    assert sum(s.faults.full_disks for s in simulations) > 0
    assert sum(s.faults.transfers for s in simulations) > 0
    assert sum(s.faults.step_downs for s in simulations) > 0
    assert sum(s.faults.dropped for s in simulations) > 0
    assert sum(s.faults.compactions for s in simulations) > 0
    assert sum(s.faults.snapshots_installed for s in simulations) > 0  # far-behind nodes caught up
    assert any(len(s.leaders) > 1 for s in simulations)
    assert all(s.acknowledged for s in simulations)


class _VotesForStaleLogs(Raft):
    def _log_up_to_date(self, last_term: int, last_index: int) -> bool:
        return True


class _AcksWhatItReceived(Raft):
    """Acknowledges entries it has not written durably: a crash then loses committed entries."""

    def _ack(self, leader_id: str, success: bool) -> Send:
        self.durable_index = self.last_index
        return super()._ack(leader_id, success)


class _CompactsUncommitted(Raft):
    """A master that snapshots its whole log, committed or not, and offers that to followers."""

    def compact(self, index: int) -> None:
        if self.role == "leader":
            self.applied = max(self.applied, self.last_index)
            index = self.last_index
        super().compact(index)


def _first_violation(raft_class: type[Raft], seeds: range) -> str | None:
    for seed in seeds:
        try:
            run_seed(seed, raft_class=raft_class)
        except AssertionError as error:
            return str(error)
    return None


def test_the_checker_catches_a_node_that_votes_for_a_stale_log() -> None:
    violation = _first_violation(_VotesForStaleLogs, range(200))
    assert violation is not None


def test_the_checker_catches_acknowledging_what_is_not_durable() -> None:
    violation = _first_violation(_AcksWhatItReceived, range(200))
    assert violation is not None


def test_the_checker_catches_a_snapshot_of_uncommitted_entries() -> None:
    violation = _first_violation(_CompactsUncommitted, range(200))
    assert violation is not None


def test_a_violation_names_its_seed() -> None:
    simulation = Simulation(7)
    try:
        simulation.fail("example")
    except Violation as error:
        assert str(error).startswith("seed 7 at ")
