"""`python -m exo.node` (the `exo` command): parse flags, wire the components, run until stopped."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil
import uvicorn
import zmq.asyncio
from litestar import Litestar

from exo.api.app import create_app
from exo.api.body_limits import DEFAULT_MAX_BODY_BYTES
from exo.api.cluster_port import ChatTokenizer
from exo.api.http_guard import (
    AcceptErrorLimiter,
    connection_limit,
    raise_descriptor_limit,
    uvicorn_options,
)
from exo.api.live_feed import LiveFeed
from exo.bus.codec import DropCounter
from exo.bus.discovery import Discovery, DiscoveryError
from exo.bus.security import cluster_tag, derive_security, new_cluster_secret, start_authenticator
from exo.bus.sockets import SocketFactory
from exo.bus.transport import Bus
from exo.core.fold import LogGapError
from exo.core.messages import TOPIC_DOWNLOADS
from exo.core.state import State
from exo.inference.blas import check_blas, load_optimized_blas
from exo.inference.client import PipelineClient, TokenSink
from exo.inference.fetcher import ModelFetcher
from exo.inference.runner_options import serving_limit_problems
from exo.inference.synthetic import ensure_builtin_model
from exo.inference.weights import WEIGHTS_DTYPES
from exo.node.api_adapter import ClusterServices, ModelCatalog
from exo.node.cluster import ClusterMember
from exo.node.generation import PipelineGenerator
from exo.node.hub_services import HubModels
from exo.node.link_probe import LinkProber
from exo.node.replica import restore
from exo.node.spare_runner import spare_enabled
from exo.node.worker import RunnerLimits, Worker
from exo.store import open_store
from exo.store.base import StoreError

logger = logging.getLogger("exo")
# The start line and `ready:` are said at every verbosity: a user needs them more than any warning.
announce = logging.getLogger(__name__)

DEFAULT_API_PORT = 52415
DEFAULT_BUS_PORT = 52414
RECONCILE_SECONDS = 1.0


@dataclass(frozen=True)
class NodeConfig:
    node_id: str | None
    data_dir: Path
    models_dir: Path
    api_port: int
    api_host: str
    api: bool
    bus_port: int
    peers: tuple[str, ...]
    discovery: bool
    force_master: bool
    event_store: str
    cluster_secret: str | None
    api_key: str | None
    verbosity: int
    metrics_public: bool = False
    runner_limits: RunnerLimits = field(default_factory=RunnerLimits)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_connections: int | None = None  # None: default_max_connections() at start
    auto_download: bool = False


def parse_args(argv: list[str] | None = None) -> NodeConfig:
    parser = argparse.ArgumentParser(prog="exo", description="Run an exo node.")
    parser.add_argument("--node-id", help="this node's id (default: persisted random id in the data dir)")
    parser.add_argument("--data-dir", type=Path, help="node id, events.db, default models dir")
    parser.add_argument("--models-dir", type=Path, help="each subfolder with a config.json is a model")
    parser.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    parser.add_argument("--api-host", default="127.0.0.1")
    parser.add_argument("--no-api", action="store_true", help="run without HTTP")
    parser.add_argument("--bus-port", type=int, default=DEFAULT_BUS_PORT, help="this node's ROUTER port")
    parser.add_argument("--peers", default="", help="static peers HOST:PORT,... (bus ports)")
    parser.add_argument("--no-discovery", action="store_true", help="no mDNS")
    parser.add_argument("--force-master", action="store_true", help="win every election")
    parser.add_argument(
        "--event-store", help="event store URL (default sqlite+aiosqlite:///DATA_DIR/events.db)"
    )
    parser.add_argument(
        "--cluster-secret", help="authenticates and encrypts the bus (env EXO_CLUSTER_SECRET)"
    )
    parser.add_argument(
        "--api-key", help="bearer token required on every route but /health (env EXO_API_KEY)"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body the API reads; more is a 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        help="HTTP connections open at once; more are refused with a 503 (default: up to 1000, "
        "within the process's file descriptor limit)",
    )
    parser.add_argument(
        "--metrics-public", action="store_true", help="serve GET /metrics without the --api-key"
    )
    limits = parser.add_argument_group("serving limits (per instance, set by its first stage's node)")
    limits.add_argument("--max-active-requests", type=int, help="requests generating at once (default 64)")
    limits.add_argument(
        "--max-waiting-requests",
        type=int,
        help="requests queued beyond those; more get 503 with Retry-After (default 64)",
    )
    limits.add_argument(
        "--max-batch-size", type=int, help="requests' decode steps in one forward pass (default 32; 1: off)"
    )
    limits.add_argument(
        "--prefix-cache-tokens",
        type=int,
        help="tokens of finished requests' KV cache kept for reuse (default 8192; 0: off)",
    )
    parser.add_argument(
        "--auto-download",
        action="store_true",
        help="a chat request for a Hugging Face model no node holds fetches it (env EXO_AUTO_DOWNLOAD=1)",
    )
    parser.add_argument(
        "--weights-dtype",
        choices=WEIGHTS_DTYPES,
        default="auto",
        help="auto: on MLX's CPU backend hold bf16/f16 weights as float32 and dequantize quantized "
        "ones (the fast path), unless memory is short; float32: always; native: as the checkpoint has them",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument(
        "--new-cluster-secret", action="store_true", help="print a fresh cluster secret and exit"
    )
    args = parser.parse_args(argv)
    if args.new_cluster_secret:
        print(new_cluster_secret())
        raise SystemExit(0)

    data_dir: Path = args.data_dir or Path(os.environ.get("EXO_HOME") or Path.home() / ".exo")
    models_dir: Path = args.models_dir or Path(os.environ.get("EXO_MODELS_DIR") or data_dir / "models")
    if problems := serving_limit_problems(vars(args)):
        parser.error("; ".join(problems))
    peers = tuple(peer.strip() for peer in args.peers.split(",") if peer.strip())
    for peer in peers:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--peers: {peer!r} is not HOST:PORT")
    try:
        spare_enabled()  # the worker reads it later: a bad value stops the node here
    except ValueError as error:
        parser.error(str(error))
    return NodeConfig(
        node_id=args.node_id,
        data_dir=data_dir,
        models_dir=models_dir,
        api_port=args.api_port,
        api_host=args.api_host,
        api=not args.no_api,
        bus_port=args.bus_port,
        peers=peers,
        discovery=not args.no_discovery,
        force_master=args.force_master,
        event_store=args.event_store or f"sqlite+aiosqlite:///{data_dir / 'events.db'}",
        cluster_secret=args.cluster_secret or os.environ.get("EXO_CLUSTER_SECRET") or None,
        api_key=args.api_key or os.environ.get("EXO_API_KEY") or None,
        verbosity=args.verbose,
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
        auto_download=args.auto_download or os.environ.get("EXO_AUTO_DOWNLOAD", "") in ("1", "true", "yes"),
        metrics_public=args.metrics_public,
        runner_limits=RunnerLimits(
            max_active_requests=args.max_active_requests,
            max_waiting_requests=args.max_waiting_requests,
            max_batch_size=args.max_batch_size,
            prefix_cache_tokens=args.prefix_cache_tokens,
            weights_dtype=args.weights_dtype,
        ),
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def load_node_id(data_dir: Path, override: str | None) -> str:
    if override:
        return override
    path = data_dir / "node_id"
    if path.exists():
        node_id = path.read_text().strip()
        if node_id:
            return node_id
    node_id = f"node-{secrets.token_hex(4)}"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(node_id + "\n")
    temporary.replace(path)
    return node_id


async def run_node(
    config: NodeConfig, stop: asyncio.Event, on_ready: Callable[[ClusterMember], None] | None = None
) -> None:
    """Run a node until `stop` is set. `on_ready` gets the cluster member once everything is up."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    node_id = load_node_id(config.data_dir, config.node_id)
    if config.cluster_secret is None:
        logger.warning("no cluster secret: the bus is open to anyone on this network (see --cluster-secret)")
    blas = load_optimized_blas()  # before anything imports mlx (tokenizers, runners inherit the choice)
    # The tokenizer stack (transformers) takes seconds to import: do it now, before the node has
    # heartbeats to keep, rather than on the first chat request.
    importlib.import_module("mlx_lm.tokenizer_utils")
    quiet_transformers()
    raise_descriptor_limit()  # after mlx-lm, whose import sets the soft limit to 2048
    blas_check = check_blas()
    if blas_check.library == "reference":
        logger.warning(
            "MLX uses the reference BLAS (%.1f GFLOP/s): decoding will be slow (%s)",
            blas_check.gflops,
            blas.reason,
        )
    else:
        logger.info("BLAS: %s, %.1f GFLOP/s float32", blas_check.library, blas_check.gflops)
    store = open_store(config.event_store)
    await store.open()
    context = zmq.asyncio.Context()
    security = derive_security(config.cluster_secret)
    bus = Bus(node_id, SocketFactory(context, security), bus_port=config.bus_port, drops=DropCounter())
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.close)
        stack.callback(context.term)
        authenticator = start_authenticator(context, security)
        if authenticator is not None:
            stack.callback(authenticator.stop)
        try:
            replica = await restore(store)
        except LogGapError as error:
            raise StoreError(
                f"the event log has a hole ({error}): `exo-replay --verify` shows where"
            ) from None
        # The built-in model, so a fresh machine with no network answers a chat request.
        await asyncio.to_thread(ensure_builtin_model, config.models_dir)
        catalog = ModelCatalog(config.models_dir, config.runner_limits.weights_dtype or "auto")
        member = ClusterMember(
            node_id,
            bus,
            replica,
            config.data_dir / "term",
            force_master=config.force_master,
            local_models=catalog.supported_ids,
            # A Hub model this node holds only a stage of (or none) is sized from its description.
            footprint_of=lambda model_id: catalog.footprint(model_id) or hub.known_footprint(model_id),
            # Peers ask for the files and Hub descriptions this node holds. The Hub models below
            # answer, and they need the member: `hub` is looked up when a request comes.
            serve_file_chunk=lambda request: hub.serve_file_chunk(request),  # noqa: PLW0108
            serve_hub_model=lambda request: hub.serve_hub_model(request),  # noqa: PLW0108
        )
        hub = HubModels(
            member,
            ModelFetcher(node_id, config.models_dir, member.submit),
            local_models=catalog.all,
            auto_download=config.auto_download,
            footprint_of_model=catalog.footprint_of_model,
        )
        bus.on_topic(TOPIC_DOWNLOADS, hub.on_progress)  # before start: the SUB subscribes then
        await bus.start()
        stack.push_async_callback(bus.close)
        stack.push_async_callback(member.close)
        await member.prepare()  # a lone node commits its log before the worker and the API read it
        host = advertise_host(config)
        bind_host = "127.0.0.1" if host == "127.0.0.1" else "0.0.0.0"
        worker = Worker(
            node_id,
            catalog.get_info,
            member.submit,
            activation_host=bind_host,
            advertise_host=None if bind_host == host else host,
            security=security,
            runner_limits=config.runner_limits,
            prepare=lambda model_id, shard, started: hub.prepare_stage(
                model_id, shard.start_layer, shard.end_layer, started
            ),
            spare_runner=spare_enabled(),
        )
        await worker.start()
        stack.push_async_callback(worker.close)
        stack.push_async_callback(cancel_task, asyncio.create_task(reconcile_runners(member, worker)))
        # The node's own context: its ZAP handler guards the token sink like the bus sockets.
        sink = TokenSink(host=bind_host, advertise_host=host, context=context, security=security)
        await sink.start()
        stack.push_async_callback(sink.close)
        client = PipelineClient(sink, context=context, security=security)
        stack.push_async_callback(client.close)
        prober = LinkProber(bus, lambda: member.liveness.alive(time.monotonic()))
        prober.start()
        stack.push_async_callback(prober.close)

        async def tokenizer(model_id: str) -> ChatTokenizer:
            """A Hub model's tokenizer files are fetched first (the catalog reads the models dir)."""
            if hub.is_hub_id(model_id):
                await hub.ensure_support_files(model_id, allow_download=hub.auto_download)
            return await catalog.tokenizer(model_id)

        generator = PipelineGenerator(
            client,
            tokenizer,
            lambda: member.state,
            holds_its_stage=worker.holds_its_stage,
            wait_for_state=member.replica.wait_for,
        )
        services = ClusterServices(
            member,
            catalog,
            generator,
            node_status_extra=lambda: {
                "blas": {
                    **msgspec.to_builtins(blas),
                    "gflops": blas_check.gflops,
                    "mapped": blas_check.library,
                },
                "runners": worker.status(),
                "downloads": msgspec.to_builtins(hub.fetcher.progress()),
                "peer_bytes_served": hub.peer_bytes_served,
                "peer_bytes_fetched": hub.peer_bytes_fetched,
                "links": prober.status(),
                "durable_event_index": member.raft.core.durable_index,
                "token_sink": {
                    "address": sink.address,
                    "dropped_frames": sink.dropped_frames,
                    "stale_frames": sink.stale_frames,
                },
            },
            holds_its_stage=worker.holds_its_stage,
            hub=hub,
        )
        stack.push_async_callback(hub.close)
        for loop in (hub.publish_progress(), hub.act_on_requests()):
            stack.push_async_callback(cancel_task, asyncio.create_task(loop))
        if config.discovery:
            discovery = await start_discovery(node_id, config, bus)
            if discovery is not None:
                stack.push_async_callback(discovery.close)
        announce.info(
            start_line(config, node_id, host, store_url=config.event_store, blas=blas_check.library)
        )
        if config.api:
            feed = LiveFeed()  # applied events, pushed to open dashboards
            replica.applied_listeners.append(feed.publish)
            app = create_app(
                services,
                api_key=config.api_key,
                max_request_bytes=config.max_body_bytes,
                manage_models=True,
                feed=feed,
                metrics_public=config.metrics_public,
            )
            max_connections = connection_limit(config.max_connections)
            api = ApiServer(app, config.api_host, config.api_port, max_connections)
            await api.start()
            stack.push_async_callback(api.stop)
            announce.info("ready: %s", api_url(config))
        # Start-up imports (transformers, mlx, litestar) leave millions of long-lived objects, and
        # every full collection walked them all, pausing the event path (docs/benchmarks-store.md).
        # Frozen, collections only walk what was made since.
        gc.collect()
        gc.freeze()
        # Last: the election's listening window starts once everything else is up.
        await member.start()
        for peer in config.peers:
            bus.add_peer(peer)
        logger.info("node %s: bus port %d, state at index %d", node_id, config.bus_port, replica.last_index)
        if on_ready is not None:
            on_ready(member)
        await stop.wait()


def api_url(config: NodeConfig) -> str:
    host = f"[{config.api_host}]" if ":" in config.api_host else config.api_host
    return f"http://{host}:{config.api_port}"


def start_line(config: NodeConfig, node_id: str, host: str, *, store_url: str, blas: str) -> str:
    """Where this node is, in one line: what a user needs to reach it, find its files and trust it."""
    bus = "CURVE (--cluster-secret)" if config.cluster_secret else "OPEN (no --cluster-secret)"
    api = api_url(config) if config.api else "off (--no-api)"
    return (
        f"exo node {node_id}: bus {host}:{config.bus_port} {bus}, api {api}, data {config.data_dir}, "
        f"models {config.models_dir}, store {store_url}, BLAS {blas}"
    )


def configure_logging(verbosity: int) -> None:
    """One format for every logger: uvicorn's and transformers' records go through the root handler."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    announce.setLevel(min(logging.INFO, logging.getLogger().level))


def quiet_transformers() -> None:
    """transformers warns on every prompt longer than the tokenizer's nominal maximum ("... will result
    in indexing errors"); exo refuses prompts longer than the model's context itself, in its own words.
    Its errors still reach the log, in exo's format."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


def advertise_host(config: NodeConfig) -> str:
    """The address peers reach this node's other sockets on: loopback for a loopback-only cluster."""
    loopback_only = not config.discovery and all(
        peer.rpartition(":")[0] in ("127.0.0.1", "localhost") for peer in config.peers
    )
    if loopback_only:
        return "127.0.0.1"
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return "127.0.0.1"


async def reconcile_runners(member: ClusterMember, worker: Worker) -> None:
    """Start and stop runners whenever the applied state moves."""
    seen = -1

    def moved(state: State) -> bool:
        return state.last_event_index != seen

    while True:
        await member.replica.wait_for(moved, RECONCILE_SECONDS)
        state = member.state
        seen = state.last_event_index
        await worker.reconcile(state)


async def cancel_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def start_discovery(node_id: str, config: NodeConfig, bus: Bus) -> Discovery | None:
    def found(peer_id: str, address: str) -> None:
        bus.add_peer(address)

    discovery = Discovery(
        node_id, config.bus_port, on_peer_found=found, cluster_tag=cluster_tag(config.cluster_secret)
    )
    try:
        await discovery.start()
    except DiscoveryError as error:
        logger.warning("mDNS discovery is off: %s (static --peers still work)", error)
        return None
    return discovery


class ApiServer:
    """uvicorn inside the node's event loop (the node owns the signals, not uvicorn)."""

    def __init__(self, app: Litestar, host: str, port: int, max_connections: int) -> None:
        self.host, self.port = host, port
        limits = uvicorn_options(max_connections)  # exo/api/http_guard.py
        self.server = uvicorn.Server(
            # log_config=None: uvicorn's records go through the node's own handler and format.
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                lifespan="on",
                access_log=False,
                log_config=None,
                **limits,
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # serve() would install its own signal handlers; the node's stop event decides when to exit.
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        AcceptErrorLimiter(asyncio.get_running_loop()).install()
        self._task = asyncio.create_task(self.server.serve(), name="api")
        while not self.server.started:
            if self._task.done():
                raise SystemExit(f"exo: the API could not listen on {self.host}:{self.port}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._task


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["models"]:
        from exo.node.models_cli import main as models_main

        raise SystemExit(models_main(arguments[1:]))
    if arguments[:1] == ["status"]:
        from exo.node.status_cli import main as status_main

        raise SystemExit(status_main(arguments[1:]))
    config = parse_args(argv)
    configure_logging(config.verbosity)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, stop.set)
        await run_node(config, stop)

    try:
        asyncio.run(_main())
    except StoreError as error:
        print(f"exo: {error}", file=sys.stderr)
        raise SystemExit(2) from None
