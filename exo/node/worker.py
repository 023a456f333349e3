"""The worker: starts, watches and stops this node's runner subprocesses (one per shard it holds).

`exo.roles.worker_plan.plan` decides what to start and stop; `Worker` is the shell that does it:
subprocesses, the control ROUTER, and the runner events it reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from exo.core.decoding import DECODE_ERRORS
from exo.core.events import Event, RunnerFailure, RunnerStatusUpdated, ShardAssignment
from exo.core.models import ModelInfo
from exo.core.security import CLUSTER_KEYS_ENVIRONMENT, BusSecurity
from exo.core.state import Instance, State
from exo.inference.protocol import (
    LoadShard,
    RingFormed,
    RingListening,
    RunnerFailed,
    RunnerStarted,
    RunnerStats,
    ShardLoaded,
    Shutdown,
    control_from_runner_decoder,
    encode,
)
from exo.inference.ring_watchdog import abandoned_exit
from exo.inference.runner import runner_command
from exo.inference.weights import WeightsDtype
from exo.node.spare_runner import SpareRunner
from exo.roles.worker_plan import LOCAL_TRANSITIONS, LocalStatus, StartRunner, StopRunner, plan

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 3.0
# A status report not yet visible in the log is repeated at most this often.
REANNOUNCE_SECONDS = 2.0


class RunnerLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A node's settings for the runners it starts (`exo --max-active-requests ...`); None keeps
    the runner's default. The first stage's serving limits decide for the whole instance;
    `weights_dtype` is each stage's own."""

    max_active_requests: int | None = None
    max_waiting_requests: int | None = None
    max_batch_size: int | None = None
    prefix_cache_tokens: int | None = None
    weights_dtype: WeightsDtype | None = None


# Fetches what a stage needs before its runner starts (a Hub model's files); calls its third
# argument first when it has anything to fetch. Raises LookupError/OSError/ValueError with the reason.
PrepareStage = Callable[[str, ShardAssignment, Callable[[], None]], Awaitable[None]]


@dataclass
class LocalRunner:
    instance_id: str
    runner_id: str
    load: LoadShard | None
    process: asyncio.subprocess.Process | None = None
    status: LocalStatus = "starting"
    activation_address: str | None = None
    stats: RunnerStats | None = None
    failure: str | None = None
    reported_at: float = 0.0
    ring_address: str | None = None  # a tensor rank's, once its runner listens
    ring_sent: bool = False  # RingFormed went to the runner
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    preparing: asyncio.Task[None] | None = field(default=None, repr=False)

    def move(self, status: LocalStatus) -> bool:
        if status not in LOCAL_TRANSITIONS[self.status]:
            return False
        self.status = status
        return True


class Worker:
    def __init__(
        self,
        node_id: str,
        find_model: Callable[[str], ModelInfo],
        report: Callable[[Sequence[Event]], None],
        *,
        activation_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        runner_threads: int | None = None,
        security: BusSecurity | None = None,
        runner_limits: RunnerLimits | None = None,
        prepare: PrepareStage | None = None,
        spare_runner: bool = False,
    ) -> None:
        self.node_id = node_id
        self._prepare = prepare
        self._find_model = find_model
        self._report = report
        self.activation_host = activation_host
        self.advertise_host = advertise_host
        self.runner_threads = runner_threads
        self.runner_limits = runner_limits or RunnerLimits()
        # Runners use the node's CURVE keys for their pipeline sockets; the keys go by environment.
        self.runner_environment = {**os.environ}
        self.runner_environment.pop(CLUSTER_KEYS_ENVIRONMENT, None)
        self.runner_environment.pop("EXO_CLUSTER_SECRET", None)  # the runner needs the keys, not this
        keys = (security or BusSecurity()).environment_value()
        if keys is not None:
            self.runner_environment[CLUSTER_KEYS_ENVIRONMENT] = keys
        self.runners: dict[str, LocalRunner] = {}
        self._context = zmq.asyncio.Context.instance()
        self._control: zmq.asyncio.Socket | None = None
        self.control_address = ""
        self._reader: asyncio.Task[None] | None = None
        self.dropped_control_frames = 0
        self._spare = SpareRunner(self.runner_argv, self.runner_environment) if spare_runner else None

    async def start(self) -> None:
        self._control = self._context.socket(zmq.ROUTER)
        self._control.setsockopt(zmq.LINGER, 0)
        port = self._control.bind_to_random_port("tcp://127.0.0.1")
        self.control_address = f"tcp://127.0.0.1:{port}"
        self._reader = asyncio.create_task(self._read_control(), name="worker-control")

    async def close(self) -> None:
        await asyncio.gather(*(self._stop(instance_id) for instance_id in list(self.runners)))
        if self._spare is not None:
            await self._spare.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._control is not None:
            self._control.close(linger=0)

    def local_statuses(self) -> dict[str, LocalStatus]:
        return {instance_id: runner.status for instance_id, runner in self.runners.items()}

    def holds_its_stage(self, instance: Instance) -> bool:
        """Whether the runner `instance` records for this node is a ready runner of this process
        (True when no stage of it is here). False for a stage restored from the log whose runner
        died with the node's previous process: the recorded address is stale until the new
        runner's report is applied, and a request sent there would fail."""
        if self.node_id not in instance.shard_assignments:
            return True
        recorded = instance.runners.get(self.node_id)
        runner = self.runners.get(instance.instance_id)
        return (
            recorded is not None
            and runner is not None
            and runner.status == "ready"
            and recorded.activation_address == runner.activation_address
        )

    async def reconcile(self, state: State) -> None:
        for decision in plan(state, self.node_id, self.local_statuses()):
            match decision:
                case StartRunner():
                    await self._start(decision)
                case StopRunner(instance_id):
                    await self._stop(instance_id)
        self._form_rings(state)
        self._reannounce(state)
        if self._spare is not None:
            busy = any(
                runner.status in ("starting", "waiting", "loading") for runner in self.runners.values()
            )
            await self._spare.keep(busy=busy)

    def _form_rings(self, state: State) -> None:
        """Hand each waiting tensor rank its ring once the log has every rank's address: the
        addresses came over the authenticated bus, so a runner only dials its instance's peers."""
        for instance_id, runner in self.runners.items():
            instance = state.instances.get(instance_id)
            if runner.ring_address is None or runner.ring_sent or instance is None:
                continue
            hosts = instance.ring_hosts()
            recorded = instance.runners.get(self.node_id)
            if hosts is None or recorded is None or recorded.ring_address != runner.ring_address:
                continue
            addresses = [instance.runners[node_id].activation_address for node_id in instance.stage_order()]
            if any(address is None for address in addresses):
                continue
            runner.ring_sent = True
            self._send(runner.runner_id, RingFormed(hosts, [a for a in addresses if a is not None]))

    def _reannounce(self, state: State) -> None:
        """Say again what is true here when the log lost it (a divergent tail dropped after a partition)."""
        for instance_id, runner in self.runners.items():
            instance = state.instances.get(instance_id)
            if instance is None or runner.status not in ("ready", "failed"):
                continue
            recorded = instance.runners.get(self.node_id)
            now = time.monotonic()
            if (recorded is None or recorded.status != runner.status) and (
                now - runner.reported_at > REANNOUNCE_SECONDS
            ):
                runner.reported_at = now
                if runner.status == "ready":
                    event = RunnerStatusUpdated(
                        instance_id,
                        self.node_id,
                        "ready",
                        activation_address=runner.activation_address,
                        ring_address=runner.ring_address,
                    )
                else:
                    event = RunnerStatusUpdated(instance_id, self.node_id, "failed", runner.failure)
                self._report([event])

    # --- runners -------------------------------------------------------------------------------

    async def _start(self, decision: StartRunner) -> None:
        if self._prepare is None:
            await self._launch(decision)
            return
        # The runner starts at once: its interpreter, mlx and model-code imports (seconds) overlap
        # the fetch of the files its stage lacks; it waits ("waiting") and gets its LoadShard when
        # they are here and verified. A failed fetch stops it (Shutdown, also if it says
        # RunnerStarted only later).
        runner_id = f"{decision.instance_id}@{self.node_id}"
        runner = LocalRunner(decision.instance_id, runner_id, None)
        self.runners[decision.instance_id] = runner
        try:
            runner.process = await self._spawn(runner_id)
        except OSError as error:
            runner.move("failed")
            runner.failure = str(error)
            self._report([RunnerStatusUpdated(decision.instance_id, self.node_id, "failed", str(error))])
            return
        runner.watcher = asyncio.create_task(self._watch(runner), name=f"worker-watch-{runner_id}")
        runner.preparing = asyncio.create_task(
            self._prepare_then_load(decision, runner), name=f"worker-prepare-{runner_id}"
        )

    async def _prepare_then_load(self, decision: StartRunner, runner: LocalRunner) -> None:
        assert self._prepare is not None

        def downloading() -> None:
            self._report([RunnerStatusUpdated(decision.instance_id, self.node_id, "downloading")])

        try:
            await self._prepare(decision.model_id, decision.assignment, downloading)
            model = self._find_model(decision.model_id)
        except (LookupError, OSError, ValueError) as error:
            if runner.move("failed"):
                runner.failure = f"model files unavailable on {self.node_id}: {error}"
                runner.reported_at = time.monotonic()
                self._report(
                    [RunnerStatusUpdated(decision.instance_id, self.node_id, "failed", runner.failure)]
                )
                self._send(runner.runner_id, Shutdown())
            return
        runner.load = load_order(decision, model.path)
        if runner.status not in ("starting", "waiting"):
            return
        self._report([RunnerStatusUpdated(decision.instance_id, self.node_id, "loading")])
        if runner.status == "waiting" and runner.move("loading"):
            self._send(runner.runner_id, runner.load)

    async def _launch(self, decision: StartRunner) -> None:
        runner_id = f"{decision.instance_id}@{self.node_id}"
        try:
            model = self._find_model(decision.model_id)
        except LookupError as error:
            self._fail_early(
                decision.instance_id, runner_id, f"model not available on {self.node_id}: {error}"
            )
            return
        load = load_order(decision, model.path)
        runner = LocalRunner(decision.instance_id, runner_id, load)
        self.runners[decision.instance_id] = runner
        self._report([RunnerStatusUpdated(decision.instance_id, self.node_id, "loading")])
        try:
            runner.process = await self._spawn(runner_id)
        except OSError as error:
            runner.move("failed")
            self._report([RunnerStatusUpdated(decision.instance_id, self.node_id, "failed", str(error))])
            return
        runner.watcher = asyncio.create_task(self._watch(runner), name=f"worker-watch-{runner_id}")

    async def _spawn(self, runner_id: str) -> asyncio.subprocess.Process:
        """The warm spare (exo/node/spare_runner.py) when there is one, else a new runner."""
        spare = await self._spare.take(runner_id) if self._spare is not None else None
        if spare is not None:
            return spare
        return await asyncio.create_subprocess_exec(*self.runner_argv(runner_id), env=self.runner_environment)

    def runner_argv(self, runner_id: str) -> list[str]:
        return runner_command(
            self.control_address,
            runner_id,
            activation_host=self.activation_host,
            advertise_host=self.advertise_host,
            threads=self.runner_threads,
            **msgspec.structs.asdict(self.runner_limits),
        )

    def _fail_early(self, instance_id: str, runner_id: str, reason: str) -> None:
        runner = LocalRunner(instance_id, runner_id, None, status="failed", failure=reason)
        self.runners[instance_id] = runner
        self._report([RunnerStatusUpdated(instance_id, self.node_id, "failed", reason)])

    async def _watch(self, runner: LocalRunner) -> None:
        assert runner.process is not None
        code = await runner.process.wait()
        if runner.status in ("stopping", "failed"):
            return
        reason = f"runner exited with code {code}"
        kind: RunnerFailure | None = None
        if (abandoned := abandoned_exit(code)) is not None:
            reason, kind = f"{reason}: {abandoned[0]}", abandoned[1]
        runner.move("failed")
        runner.failure = reason
        logger.warning("runner %s: %s", runner.runner_id, reason)
        self._report([RunnerStatusUpdated(runner.instance_id, self.node_id, "failed", reason, failure=kind)])

    async def _stop(self, instance_id: str) -> None:
        runner = self.runners.get(instance_id)
        if runner is None:
            return
        runner.status = "stopping"
        process = runner.process
        if process is not None and process.returncode is None:
            self._send(runner.runner_id, Shutdown())
            try:
                async with asyncio.timeout(STOP_GRACE_SECONDS):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        for task in (runner.watcher, runner.preparing):
            if task is not None:
                task.cancel()
        self.runners.pop(instance_id, None)

    # --- control channel -----------------------------------------------------------------------

    def _send(self, runner_id: str, message: msgspec.Struct) -> None:
        assert self._control is not None
        with contextlib.suppress(zmq.ZMQError):
            self._control.send_multipart([runner_id.encode(), encode(message)], flags=zmq.NOBLOCK)

    def _runner_by_id(self, runner_id: str) -> LocalRunner | None:
        for runner in self.runners.values():
            if runner.runner_id == runner_id:
                return runner
        return None

    async def _read_control(self) -> None:
        assert self._control is not None
        while True:
            frames = await self._control.recv_multipart()
            if len(frames) != 2:
                self.dropped_control_frames += 1
                continue
            identity, payload = frames
            try:
                message = control_from_runner_decoder.decode(payload)
            except DECODE_ERRORS:
                self.dropped_control_frames += 1
                continue
            runner = self._runner_by_id(identity.decode(errors="replace"))
            if runner is None:
                self.dropped_control_frames += 1
                continue
            self._on_control(runner, message)

    def _on_control(
        self,
        runner: LocalRunner,
        message: RunnerStarted | RingListening | ShardLoaded | RunnerFailed | RunnerStats,
    ) -> None:
        match message:
            case RunnerStarted():
                if runner.status == "failed":  # its files failed before it could hear Shutdown
                    self._send(runner.runner_id, Shutdown())
                elif runner.load is not None and runner.move("loading"):
                    self._send(runner.runner_id, runner.load)
                else:
                    runner.move("waiting")
            case RingListening(ring_address=ring, activation_address=address):
                if runner.status == "loading" and runner.ring_address is None:
                    runner.ring_address = ring
                    event = RunnerStatusUpdated(
                        runner.instance_id,
                        self.node_id,
                        "loading",
                        activation_address=address,
                        ring_address=ring,
                    )
                    self._report([event])
            case ShardLoaded(activation_address=address):
                if runner.move("ready"):
                    runner.activation_address = address
                    runner.reported_at = time.monotonic()
                    self._report(
                        [
                            RunnerStatusUpdated(
                                runner.instance_id,
                                self.node_id,
                                "ready",
                                activation_address=address,
                                ring_address=runner.ring_address,
                            )
                        ]
                    )
            case RunnerFailed(reason=reason, failure=failure):
                if runner.move("failed"):
                    runner.failure = reason
                    runner.reported_at = time.monotonic()
                    self._report(
                        [
                            RunnerStatusUpdated(
                                runner.instance_id, self.node_id, "failed", reason, failure=failure
                            )
                        ]
                    )
            case RunnerStats():
                runner.stats = message

    def status(self) -> dict[str, object]:
        return {
            instance_id: {
                "status": runner.status,
                "pid": runner.process.pid if runner.process is not None else None,
                "activation_address": runner.activation_address,
                "failure": runner.failure,
                "stats": msgspec.to_builtins(runner.stats) if runner.stats is not None else None,
            }
            for instance_id, runner in self.runners.items()
        }


def load_order(decision: StartRunner, model_path: str) -> LoadShard:
    """What a runner loads for a start decision: its layers, its tensor rank, its representation
    (one place, so the download-first path and the direct one cannot drift apart)."""
    return LoadShard(
        instance_id=decision.instance_id,
        model_id=decision.model_id,
        model_path=model_path,
        start_layer=decision.assignment.start_layer,
        end_layer=decision.assignment.end_layer,
        n_layers=decision.assignment.n_layers,
        rank=decision.assignment.rank,
        size=decision.assignment.size,
        placed_weights=decision.placed_weights,
    )
