"""The runner subprocess: one per shard, started and supervised by the node's worker.

`python -m exo.inference.runner --control tcp://127.0.0.1:PORT [--runner-id ID]`

The worker binds a ROUTER at the control address; the runner connects a DEALER whose routing id is
its runner id, imports what loading needs (mlx, mlx-lm's model code), says `RunnerStarted`, waits
for `LoadShard` (a Hub model's files may still be downloading), loads, binds its activation PULL and
answers `ShardLoaded` (or `RunnerFailed`, then exits 1). From then on it serves pipeline frames
until `Shutdown` (exit 0) or until its parent dies. Plain zmq with a poller: MLX compute blocks
this process only, never the node's event loop. A heartbeat thread tells requesters which of their
requests this stage holds, so a stage that dies is noticed in seconds even during a long prefill
(MLX releases the GIL while it computes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import resource
import sys
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import psutil
import zmq

from exo.core.decoding import DECODE_ERRORS
from exo.core.events import RunnerFailure
from exo.core.security import apply_curve
from exo.inference.blas import BlasInfo, load_optimized_blas
from exo.inference.curve import security_from_environment, start_thread_authenticator
from exo.inference.heap import release_freed_buffers
from exo.inference.pass_threads import PassThreads, mkl_thread_setter
from exo.inference.protocol import (
    LoadShard,
    RingFormed,
    RingListening,
    RunnerFailed,
    RunnerStarted,
    RunnerStats,
    ShardLoaded,
    Shutdown,
    control_to_runner_decoder,
    encode,
)
from exo.inference.runner_options import SPARE_FLAG, RunnerOptions, parse_arguments, runner_command
from exo.inference.stage_sockets import PushSockets, StageBeacon

if TYPE_CHECKING:
    from exo.inference.ring_watchdog import PassWatchdog
    from exo.inference.stage import Outgoing, PipelineStage
    from exo.inference.tensor import StepFollower, StepLeader

logger = logging.getLogger("exo.inference.runner")
__all__ = ["Runner", "RunnerOptions", "main", "parse_arguments", "runner_command"]  # the worker's imports

Lifecycle = Literal["starting", "loading", "ready", "failed", "stopping"]
TRANSITIONS: dict[Lifecycle, frozenset[Lifecycle]] = {
    "starting": frozenset({"loading", "stopping"}),
    "loading": frozenset({"ready", "failed", "stopping"}),
    "ready": frozenset({"failed", "stopping"}),  # failed: a tensor rank whose group broke
    "failed": frozenset({"stopping"}),
    "stopping": frozenset(),
}
MAX_FRAMES_PER_TURN = 256  # bound the receive drain so compute is never starved


def peak_resident_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    runner started by a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Runner:
    def __init__(self, options: RunnerOptions, blas: BlasInfo) -> None:
        self.options = options
        self.blas = blas
        self.lifecycle: Lifecycle = "starting"
        self.instance_id: str | None = None
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        # With a cluster secret every pipeline socket is CURVE: the worker hands down the derived keys.
        self.security = security_from_environment()
        self.authenticator = start_thread_authenticator(self.context, self.security)
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.ROUTING_ID, options.runner_id.encode())
        self.control.setsockopt(zmq.LINGER, 2000)  # let a final RunnerFailed reach the worker
        self.control.setsockopt(zmq.SNDTIMEO, 2000)  # a gone worker must not block the runner forever
        self.control.connect(options.control)
        self.activations: zmq.Socket[bytes] | None = None
        self.pushes = PushSockets(self.context, options.send_timeout, self.security)
        self.stage: PipelineStage | None = None
        self.heartbeat: StageBeacon | None = None
        # A tensor rank: the LoadShard waiting for its ring, and rank 0's or another rank's side.
        self.waiting_for_ring: LoadShard | None = None
        self.leader: StepLeader | None = None
        self.follower: StepFollower | None = None
        self.watchdog: PassWatchdog | None = None  # a tensor rank's bound on a pass (ring_watchdog)
        self.dropped_control_frames = 0
        self.exit_code = 0
        self._parent_pid = os.getppid()
        self._requests_announced = 0
        self._process = psutil.Process()

    def transition(self, target: Lifecycle) -> None:
        if target not in TRANSITIONS[self.lifecycle]:
            raise RuntimeError(f"runner cannot go from {self.lifecycle} to {target}")
        self.lifecycle = target

    def send_control(self, message: msgspec.Struct) -> None:
        try:
            self.control.send(encode(message))
        except zmq.Again:
            logger.warning("worker not reachable; dropped %s", type(message).__name__)

    # --- control --------------------------------------------------------------------------

    def handle_control(self, frame: bytes) -> None:
        try:
            message = control_to_runner_decoder.decode(frame)
        except DECODE_ERRORS:
            self.dropped_control_frames += 1
            return
        match message:
            case Shutdown():
                self.transition("stopping")
            case LoadShard() if self.lifecycle == "starting":
                self.load(message)
            case LoadShard():
                self.dropped_control_frames += 1  # one runner, one shard
            case RingFormed() if self.waiting_for_ring is not None:
                self.join_ring(self.waiting_for_ring, message)
            case RingFormed():
                self.dropped_control_frames += 1

    def load(self, command: LoadShard) -> None:
        self.transition("loading")
        self.instance_id = command.instance_id
        if command.size == 1:
            return self.load_shard(command)
        # A tensor rank: listen first, load once the worker says where every rank listens.
        from exo.inference.tensor import ring_address

        if not 0 <= command.rank < command.size:
            return self.fail(f"rank {command.rank} is outside a tensor group of {command.size}")
        from exo.inference.ring_watchdog import pass_timeout_from_environment

        try:
            pass_timeout_from_environment()  # a bad bound fails the rank now, not once loaded
        except ValueError as error:
            return self.fail(str(error))
        # The ring listens on the one address peers reach this node at, never on every interface.
        host = self.options.advertise_host or self.options.activation_host
        if host in ("0.0.0.0", "::", "*", ""):
            return self.fail("a tensor rank needs the address its peers reach it at (--advertise-host)")
        try:
            ring = ring_address(host)
        except OSError as error:
            return self.fail(f"cannot listen for the tensor ring on {host}: {error}")
        self.bind_activations()
        self.waiting_for_ring = command
        self.send_control(RingListening(command.instance_id, ring, self.activation_address()))
        return None

    def join_ring(self, command: LoadShard, ring: RingFormed) -> None:
        from exo.inference.tensor import StepFollower, StepLeader, join_ring

        self.waiting_for_ring = None
        if len(ring.hosts) != command.size or len(ring.activation_addresses) != command.size:
            return self.fail(f"ring of {len(ring.hosts)} ranks for a tensor group of {command.size}")
        try:
            group = join_ring(ring.hosts, command.rank)
        except (RuntimeError, ValueError, OSError) as error:
            return self.fail(f"could not join the tensor ring {ring.hosts}: {error}")
        if command.rank == 0:
            self.leader = StepLeader(ring.activation_addresses[1:])
        else:
            self.follower = StepFollower()
        self.load_shard(command, group)
        if self.lifecycle == "ready":
            self.watch_passes(ring.hosts, command.rank)
        return None

    def watch_passes(self, hosts: list[str], rank: int) -> None:
        """Start the bound on a pass stuck in a collective (exo.inference.ring_watchdog)."""
        from exo.inference.ring_watchdog import (
            PassWatchdog,
            RingHealth,
            cut_ring_connections,
            pass_timeout_from_environment,
            ring_endpoints,
        )

        timeout = pass_timeout_from_environment()  # checked in `load`
        own_port, peers = ring_endpoints(hosts, rank)

        def interrupted(reason: str) -> None:
            if self.stage is not None:
                self.stage.interrupted_because = reason

        cut = lambda: cut_ring_connections(own_port, peers)  # noqa: E731
        health = RingHealth(own_port, peers)
        self.watchdog = PassWatchdog(timeout, rank, cut, interrupted, lost=health.lost, abandon=self.abandon)
        self.watchdog.start()

    def abandon(self, reason: str, stalled: bool) -> None:
        """From the watchdog's thread, for a pass MLX will never end (its ring's socket threads
        gave up, ring_watchdog says why): tell the requesters, then exit with the code the worker
        reads as this failure. The main thread is stuck inside MLX and owns the other sockets."""
        from exo.inference.ring_watchdog import EXIT_RING_LOST, EXIT_STALLED

        told = self.heartbeat.fail_requests(reason) if self.heartbeat is not None else 0
        logger.error("abandoning a stuck pass (%d request(s) told): %s", told, reason)
        logging.shutdown()
        os._exit(EXIT_STALLED if stalled else EXIT_RING_LOST)

    def bind_activations(self) -> None:
        if self.activations is not None:
            return
        self.activations = self.context.socket(zmq.PULL)
        self.activations.setsockopt(zmq.LINGER, 0)
        self.activations.setsockopt(zmq.RCVHWM, 10_000)
        apply_curve(self.activations, self.security, server=True)
        self.activations.bind(f"tcp://{self.options.activation_host}:*")

    def load_shard(self, command: LoadShard, group: Any = None) -> None:
        import mlx.core as mx

        from exo.inference.shard import ShardLoadError, ShardSpec, load_shard
        from exo.inference.stage import PipelineStage
        from exo.inference.weights import wanted_representation

        spec = ShardSpec(
            start_layer=command.start_layer, end_layer=command.end_layer, n_layers=command.n_layers
        )
        representation = wanted_representation(
            self.options.weights_dtype,
            placed=command.placed_weights,
            accelerator=mx.default_device().type == mx.DeviceType.gpu,
        )
        started = time.perf_counter()
        try:
            shard = load_shard(Path(command.model_path), spec, representation, group=group)
        except ShardLoadError as error:
            return self.fail(str(error))
        except MemoryError:
            return self.fail(f"out of memory loading layers [{spec.start_layer}, {spec.end_layer})")
        except (OSError, RuntimeError, ValueError) as error:
            # MLX raises RuntimeError for unreadable or truncated safetensors files
            return self.fail(f"could not load {command.model_id}: {error}")
        load_seconds = time.perf_counter() - started
        self.bind_activations()
        address = self.activation_address()
        self.stage = PipelineStage(
            shard,
            address,
            prefill_step_size=self.options.prefill_step_size,
            max_active_requests=self.options.max_active_requests,
            max_waiting_requests=self.options.max_waiting_requests,
            max_batch_size=self.options.max_batch_size,
            prefix_cache_tokens=self.options.prefix_cache_tokens,
            retry_after=self.options.retry_after,
            pass_threads=self.pass_threads(),
        )
        if self.follower is None:  # requesters hear from rank 0 only: it answers for the instance
            self.heartbeat = StageBeacon(
                self.context, address, self.options.heartbeat_interval, self.security
            )
            self.heartbeat.start()
        self.transition("ready")
        self.send_control(
            ShardLoaded(
                instance_id=command.instance_id,
                activation_address=address,
                start_layer=spec.start_layer,
                end_layer=spec.end_layer,
                weight_bytes=shard.weight_bytes,
                load_seconds=load_seconds,
                blas=self.blas.library,
                weights=shard.representation,
            )
        )
        return None

    def pass_threads(self) -> PassThreads | None:
        set_threads = mkl_thread_setter(self.blas)
        if set_threads is None or self.blas.threads is None:
            return None
        return PassThreads(set_threads, default=self.blas.threads, batched=self.options.batch_threads)

    def activation_address(self) -> str:
        assert self.activations is not None
        endpoint = self.activations.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes)
        port = endpoint.decode().rsplit(":", 1)[1]
        host = self.options.advertise_host or self.options.activation_host
        return f"tcp://{host}:{port}"

    def fail(self, reason: str, failure: RunnerFailure | None = None) -> None:
        logger.error("runner failed: %s", reason)
        self.transition("failed")
        self.send_control(RunnerFailed(reason=reason, instance_id=self.instance_id, failure=failure))
        self.exit_code = 1
        self.transition("stopping")

    # --- pipeline -------------------------------------------------------------------------

    def send_all(self, outgoing: list[Outgoing]) -> None:
        assert self.stage is not None
        pending = list(outgoing)
        while pending:
            item = pending.pop(0)
            if not self.pushes.send(item.address, item.frames):
                if self.leader is not None and item.to_requester:
                    held = [
                        rid
                        for rid in (item.request_id, *item.batch_request_ids)
                        if rid in self.stage.requests
                    ]
                    self.leader.requesters_gone(held)
                pending.extend(self.stage.send_failed(item))

    def receive_activations(self) -> None:
        assert self.activations is not None and self.stage is not None
        for _ in range(MAX_FRAMES_PER_TURN):
            try:
                frames = self.activations.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if self.follower is not None:
                self.follow([frame.buffer for frame in frames])
                if self.lifecycle == "stopping":
                    return
            elif self.leader is not None:
                self.lead([frame.buffer for frame in frames])
            else:
                self.send_all(self.stage.handle_frames([frame.buffer for frame in frames]))

    # --- tensor ranks -----------------------------------------------------------------------

    def lead(self, frames: list[memoryview]) -> None:
        """Rank 0 takes a frame: handled here, and shared with the other ranks at the next step."""
        from exo.inference.tensor import with_seed

        assert self.stage is not None and self.leader is not None
        if len(frames) != 1:  # hidden states: a tensor instance has no stage before rank 0
            self.stage.counters.dropped_frames += 1
            return
        frame = with_seed(bytes(frames[0]))
        self.leader.took(frame)
        self.send_all(self.stage.handle_frames([frame]))

    def share_step(self, run: bool) -> bool:
        """Rank 0 pushes its step to every other rank; False (and the runner fails, failing its
        requests) when one cannot take it in time: that rank is gone, the group cannot compute."""
        assert self.stage is not None and self.leader is not None
        step = self.leader.next_step(run)
        if step is None:
            return True
        for rank, address in enumerate(self.leader.follower_addresses, start=1):
            if not self.pushes.send(address, (step,)):
                reason = f"tensor rank {rank} ({address}) is unreachable"
                self.send_all(self.stage.abort_all(reason))
                self.fail(reason)
                return False
        return True

    def follow(self, frames: list[memoryview]) -> None:
        """A rank > 0 applies rank 0's step to its own stage, throwing away what it would send."""
        assert self.stage is not None and self.follower is not None
        try:
            step = self.follower.decode(frames)
        except ValueError as error:
            return self.fail(f"tensor rank out of step: {error}")
        if step is None:
            self.dropped_control_frames += 1
            return None
        for message in step.messages:
            self.stage.handle_frames([message])
        if step.run:
            if not self.stage.has_work():
                return self.fail(
                    f"tensor rank out of step: rank 0 ran step {step.turn}, this rank has no work"
                )
            self.run_pass()
        return self.check_fatal()

    def run_pass(self) -> list[Outgoing]:
        """The stage's next pass, watched on a tensor rank (a frozen peer must not block it forever)."""
        assert self.stage is not None
        if self.watchdog is None:
            return self.stage.run_next()
        self.watchdog.begin()
        try:
            return self.stage.run_next()
        finally:
            self.watchdog.end()

    def check_fatal(self) -> None:
        if self.stage is not None and self.stage.fatal_error is not None and self.lifecycle == "ready":
            # The watchdog's reason is set only when it cut the ring on a pass past its bound.
            stalled = self.stage.interrupted_because is not None
            self.fail(self.stage.fatal_error, "tensor_stall" if stalled else None)

    def stats(self) -> RunnerStats:
        assert self.stage is not None and self.instance_id is not None
        counters = self.stage.counters
        return RunnerStats(
            instance_id=self.instance_id,
            steps_done=counters.steps_done,
            tokens_sampled=counters.tokens_sampled,
            active_requests=len(self.stage.requests),
            queued_work=len(self.stage.scheduler),
            dropped_frames=counters.dropped_frames + self.dropped_control_frames,
            stale_frames=counters.stale_frames,
            resident_bytes=self._process.memory_info().rss,
            peak_resident_bytes=peak_resident_bytes(),
            waiting_requests=len(self.stage.admission.waiting),
            refused_requests=self.stage.admission.refused,
            batched_steps=counters.batched_steps,
            batched_rows=counters.batched_rows,
            largest_batch=counters.largest_batch,
            prefix_cache_entries=self.stage.prefix.usable_entries(),
            prefix_cache_tokens=sum(self.stage.prefix.snapshots.tokens.values()),
            prefix_cache_bytes=self.stage.prefix.snapshots.nbytes,
            prefix_cache_hits=counters.prefix_cache_hits,
            cached_prompt_tokens=counters.cached_prompt_tokens,
            grouped_prompt_chunks=counters.grouped_prompt_chunks,
        )

    # --- loop -----------------------------------------------------------------------------

    def run(self) -> int:
        self.send_control(RunnerStarted(runner_id=self.options.runner_id, pid=os.getpid()))
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        next_stats = time.monotonic() + self.options.stats_interval
        try:
            while self.lifecycle != "stopping":
                if self.stage is not None and self.activations not in dict(poller.sockets):
                    poller.register(self.activations, zmq.POLLIN)
                # A rank > 0 computes only when rank 0's step arrives: it waits on its socket.
                busy = self.stage is not None and self.follower is None and self.stage.has_work()
                ready = dict(poller.poll(0 if busy else 100))
                if self.control in ready:
                    while self.lifecycle != "stopping":
                        try:
                            self.handle_control(self.control.recv(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                if self.lifecycle == "stopping":
                    break
                if self.activations is not None and self.activations in ready:
                    self.receive_activations()
                    self.announce_requests()  # before the next pass, which may take seconds
                if self.lifecycle == "stopping":
                    break
                if self.stage is not None and self.follower is None:
                    if self.stage.has_work():
                        if self.leader is not None and not self.share_step(run=True):
                            break
                        self.send_all(self.run_pass())
                        self.check_fatal()
                        if self.lifecycle == "stopping":
                            break
                    elif self.leader is not None and not self.share_step(run=False):
                        break
                    self.announce_requests()
                now = time.monotonic()
                if now >= next_stats:
                    next_stats = now + self.options.stats_interval
                    if os.getppid() != self._parent_pid:
                        logger.warning("parent process is gone; runner exits")
                        break
                    if self.lifecycle == "ready":
                        self.send_control(self.stats())
        finally:
            if os.getppid() == self._parent_pid:  # else the requesters died with the node
                self.fail_requests("the runner stopped")
            self.close()
        return self.exit_code

    def announce_requests(self) -> None:
        """Hand the heartbeat the requests held now, and wake it if a new one arrived."""
        if self.stage is None or self.heartbeat is None:
            return
        self.heartbeat.requests_by_requester = self.stage.requests_by_requester()
        if self.stage.counters.requests_started != self._requests_announced:
            self._requests_announced = self.stage.counters.requests_started
            self.heartbeat.wake()

    def fail_requests(self, reason: str) -> None:
        """Tell the requester of every request held here, or still unread, that it ends."""
        if self.stage is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            if self.activations is not None:
                self.receive_activations()
            self.send_all(self.stage.fail_all(reason))

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.watchdog is not None:
            self.watchdog.stop()
        self.pushes.close()
        if self.activations is not None:
            self.activations.close(linger=0)
        self.control.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.context.term()


def import_model_code_only() -> None:
    """Let `import mlx_lm.models.X` skip mlx_lm/__init__.py, which pulls in mlx-lm's generation,
    tokenizer and server stack (transformers): seconds at every runner start, for code a runner
    never calls. Only for this process, before anything imported mlx_lm."""
    if "mlx_lm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType("mlx_lm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["mlx_lm"] = package


def import_loading_code() -> None:
    """Import what `load_shard` needs (mlx, the stage, mlx-lm's model modules exo supports)
    before saying RunnerStarted: a runner started while its stage's files download pays these
    imports (a second or more on a busy machine) while it waits, not after the files arrive."""
    from exo.inference.shard import supported_model_modules

    for module in ["mlx.core", "exo.inference.stage", "exo.inference.weights", *supported_model_modules()]:
        importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    spare = SPARE_FLAG in arguments
    options = parse_arguments([each for each in arguments if each != SPARE_FLAG])
    blas = load_optimized_blas(options.threads)  # before anything imports mlx
    release_freed_buffers()
    import_model_code_only()
    import_loading_code()
    if spare:
        runner_id = sys.stdin.readline().strip()
        if not runner_id:
            return 0  # the node closed the spare's input: no stage came
        options = msgspec.structs.replace(options, runner_id=runner_id)
    return Runner(options, blas).run()


if __name__ == "__main__":
    sys.exit(main())
