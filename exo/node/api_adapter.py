"""The node as the HTTP API sees it: `NodeServices` over the cluster member, the store and the models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exo.api.cluster_port import (
    ChatTokenizer,
    ClusterUnavailable,
    InstanceFailed,
    InstanceNotFound,
    InstanceNotReady,
    ModelNotFound,
    ModelUnavailable,
    NoCapacity,
    NodeNotFound,
    NodeStillAnswers,
    TokenStream,
)
from exo.bus.transport import RequestTimedOut
from exo.core import messages as m
from exo.core.events import IndexedEvent, Sharding
from exo.core.models import ModelFootprint, ModelInfo
from exo.core.placement import PlacementPreview
from exo.core.sampling import SamplingParams
from exo.core.state import Instance, State
from exo.inference.models import InvalidModelIdError, ModelNotFoundError, get_model, list_models
from exo.inference.weights import WeightsDtype, accelerator_backend
from exo.node.cluster import ClusterMember
from exo.node.generation import PipelineGenerator
from exo.roles.commands import reserved_bytes
from exo.roles.placement import previews
from exo.roles.tensor_placement import tensor_previews

if TYPE_CHECKING:
    from exo.api.model_routes import NodeModelState
    from exo.node.hub_services import HubModels

COMMAND_SECONDS = 10.0
MASTER_WAIT_SECONDS = 10.0
# A cluster change waits this long for a majority before it is refused with 503 and Retry-After.
QUORUM_WAIT_SECONDS = 2.0
QUORUM_RETRY_AFTER_SECONDS = 2.0
APPLY_WAIT_SECONDS = 5.0
MODEL_LIST_CACHE_SECONDS = 2.0


class ModelCatalog:
    """This node's models dir, listed at most every couple of seconds (heartbeats ask often)."""

    def __init__(self, models_dir: Path, weights_dtype: WeightsDtype = "auto") -> None:
        self.models_dir = models_dir
        # This node's `--weights-dtype`: the footprint it asks placement for is the bytes its
        # runners would hold (float32 on MLX's CPU backend, with the native bytes to fall back on).
        self.weights_dtype: WeightsDtype = weights_dtype
        self._accelerator = accelerator_backend()
        self._listed_at = -MODEL_LIST_CACHE_SECONDS
        self._models: list[ModelInfo] = []
        self._tokenizers: dict[str, ChatTokenizer] = {}

    def all(self) -> list[ModelInfo]:
        now = time.monotonic()
        if now - self._listed_at >= MODEL_LIST_CACHE_SECONDS:
            self._models = list_models(self.models_dir) if self.models_dir.is_dir() else []
            self._listed_at = now
        return self._models

    def supported_ids(self) -> list[str]:
        """Models this node can serve whole (a Hub model of which it holds a stage's files only
        is not one: placement must not count on it)."""
        from exo.inference.manifest import is_complete

        return [model.model_id for model in self.all() if model.supported and is_complete(Path(model.path))]

    def get_info(self, model_id: str) -> ModelInfo:
        """The model's info; LookupError/ValueError (from exo.inference.models) when it is not here."""
        return get_model(self.models_dir, model_id)

    def footprint(self, model_id: str) -> ModelFootprint | None:
        try:
            model = self.get_info(model_id)
        except (ModelNotFoundError, InvalidModelIdError):
            return None
        return self.footprint_of_model(model) if model.supported else None

    def footprint_of_model(self, model: ModelInfo) -> ModelFootprint:
        return ModelFootprint.of_model(model, self.weights_dtype, accelerator=self._accelerator)

    def get(self, model_id: str) -> ModelInfo:
        try:
            return self.get_info(model_id)
        except (ModelNotFoundError, InvalidModelIdError) as error:
            raise ModelNotFound(model_id) from error

    async def tokenizer(self, model_id: str) -> ChatTokenizer:
        """The model's tokenizer, loaded once (in a thread: it reads files and imports mlx)."""
        cached = self._tokenizers.get(model_id)
        if cached is not None:
            return cached
        model = self.get(model_id)
        from mlx_lm.tokenizer_utils import load as load_tokenizer  # imports mlx: after the BLAS loader

        tokenizer: ChatTokenizer = await asyncio.to_thread(load_tokenizer, Path(model.path))
        self._tokenizers[model_id] = tokenizer
        return tokenizer


class ClusterServices:
    def __init__(
        self,
        member: ClusterMember,
        catalog: ModelCatalog,
        generator: PipelineGenerator,
        *,
        node_status_extra: Callable[[], dict[str, Any]] | None = None,
        holds_its_stage: Callable[[Instance], bool] | None = None,
        hub: HubModels | None = None,
    ) -> None:
        self.member = member
        self.catalog = catalog
        # Whether this node's stage of an instance is served by a runner of this process (the
        # worker's answer); a stage restored from the log may name a runner that died with the node.
        self._holds_its_stage = holds_its_stage or (lambda _instance: True)
        self.started_at = time.monotonic()
        self._node_status_extra = node_status_extra or dict
        self.generator = generator
        self.hub = hub  # Hub ids and downloads (none: this node fetches no models)

    @property
    def node_id(self) -> str:
        return self.member.node_id

    def state(self) -> State:
        return self.member.state

    async def events_since(self, index: int, limit: int) -> list[IndexedEvent]:
        return await self.member.replica.read(index + 1, limit=max(1, limit))

    def node_status(self) -> dict[str, object]:
        member = self.member
        bus = member.bus
        now = time.monotonic()
        status: dict[str, object] = {
            "node_id": member.node_id,
            "uptime_s": round(now - self.started_at, 3),
            "is_master": member.is_master,
            # Whether this node reaches a majority of the members (cluster changes need one).
            # Not in /state: that is derived from the log alone.
            "quorum": member.has_quorum(),
            "election_phase": member.role,
            "term": member.term,
            "leader_id": member.leader_id,
            "last_event_index": member.replica.last_index,
            "bus_port": bus.bus_port,
            "pub_port": bus.pub_port,
            "peers": {
                address: {"node_id": peer.node_id, "alive": peer.node_id in member.liveness.alive(now)}
                for address, peer in bus.peers.items()
            },
            "dropped_frames": dict(bus.drops.counts),
            "dropped_frames_total": bus.drops.total,
            "frames_received": bus.frames_received,
            "queue_depths": member.queue_depths(),
            "counters": {
                "local_events_resent": member.outbox.resent,
                "raft_messages_dropped": member.raft.dropped_messages,
                "forced_campaigns": member.counters.forced_campaigns,
            },
        }
        status.update(self._node_status_extra())
        return status

    def models(self) -> list[ModelInfo]:
        return sorted(self.catalog.all(), key=lambda model: model.model_id)

    # --- commands ------------------------------------------------------------------------------

    async def _command(self, command: m.Command) -> m.CommandAnswered:
        member = self.member
        if not isinstance(command, m.RemoveNode):  # the way back to a majority needs none
            await self._wait_for_quorum()
        elif not member.has_quorum():
            return await member.execute(command)  # the operator's override (ClusterMember.execute)
        if member.is_master:
            return await member.execute(command)
        master_id = await self._master_id()
        if master_id == member.node_id:
            return await member.execute(command)
        try:
            reply = await member.bus.request(master_id, m.CommandRequested(command), timeout=COMMAND_SECONDS)
        except RequestTimedOut as error:
            raise ClusterUnavailable(str(error)) from error
        if isinstance(reply, m.CommandAnswered):
            return reply
        reason = reply.reason if isinstance(reply, m.RequestFailed) else type(reply).__name__
        raise ClusterUnavailable(reason)

    async def _wait_for_quorum(self) -> None:
        """Cluster changes need a majority of the members (a node that just started hears them
        within a heartbeat or two); without one they are refused, serving goes on."""
        deadline = time.monotonic() + QUORUM_WAIT_SECONDS
        while not self.member.has_quorum():
            if time.monotonic() >= deadline:
                members = len(self.member.state.nodes | {self.node_id: None})
                raise ClusterUnavailable(
                    f"no quorum: this node reaches fewer than a majority of the {members} members "
                    "(serving goes on; retry when the members are back)",
                    retry_after_s=QUORUM_RETRY_AFTER_SECONDS,
                )
            await asyncio.sleep(0.05)

    async def _master_id(self) -> str:
        """The master, waiting a few seconds for an election in progress (a node just started)."""
        deadline = time.monotonic() + MASTER_WAIT_SECONDS
        while (master_id := self.member.leader_id) is None:
            if time.monotonic() >= deadline:
                raise ClusterUnavailable(f"no master elected after {MASTER_WAIT_SECONDS:g} s")
            await asyncio.sleep(0.05)
        return master_id

    async def _wait_applied(self, predicate: Callable[[State], bool]) -> None:
        if not await self.member.replica.wait_for(predicate, APPLY_WAIT_SECONDS):
            raise ClusterUnavailable("the master's events did not reach this node in time")

    async def place_instance(self, model_id: str, sharding: Sharding, min_nodes: int) -> Instance:
        return await self._place(model_id, sharding, min_nodes, allow_download=True)

    async def _place(
        self, model_id: str, sharding: Sharding, min_nodes: int, *, allow_download: bool
    ) -> Instance:
        """A Hub id is placed from the Hub's metadata; the chosen nodes fetch what they lack."""
        hub = self.hub
        download = hub is not None and hub.is_hub_id(model_id)
        if hub is not None and download:
            model = await hub.describe(model_id, allow_download=allow_download)
        else:
            model = self.catalog.get(model_id)
        if not model.supported:
            raise NoCapacity(model_id, [model.reason])
        # A node that just started: let the master record it before placing on the cluster it knows.
        node_id = self.node_id
        await self.member.replica.wait_for(
            lambda state: node_id in state.nodes and state.nodes[node_id].status == "alive",
            MASTER_WAIT_SECONDS,
        )
        answer = await self._command(
            m.PlaceInstance(
                model_id, self.catalog.footprint_of_model(model), sharding, min_nodes, download=download
            )
        )
        match answer.answer:
            case m.Placed(instance_id=instance_id):
                pass
            case m.Refused(reason="model_not_held" | "does_not_fit", detail=detail):
                raise NoCapacity(model_id, [detail or "placement refused"])
            case m.Refused(detail=detail):
                raise ClusterUnavailable(detail or "placement refused")
            case other:
                raise ClusterUnavailable(f"unexpected answer to PlaceInstance: {type(other).__name__}")
        await self._wait_applied(lambda state: instance_id in state.instances)
        return self.state().instances[instance_id]

    def previews(self, model_id: str) -> list[PlacementPreview]:
        model = self.catalog.get(model_id)
        footprint = self.catalog.footprint_of_model(model)
        state = self.state()
        alive = [node for node in state.nodes.values() if node.status == "alive"]
        reserved = reserved_bytes(state, {model_id: footprint})
        return [*previews(footprint, alive, reserved), *tensor_previews(footprint, alive, reserved)]

    async def delete_instance(self, instance_id: str) -> None:
        if instance_id not in self.state().instances:
            raise InstanceNotFound(instance_id)
        answer = await self._command(m.DeleteInstance(instance_id))
        match answer.answer:
            case m.Deleted():
                pass
            case m.Refused(reason="instance_not_found"):
                raise InstanceNotFound(instance_id)
            case m.Refused(detail=detail):
                raise ClusterUnavailable(detail or "delete refused")
            case other:
                raise ClusterUnavailable(f"unexpected answer to DeleteInstance: {type(other).__name__}")
        await self._wait_applied(lambda state: instance_id not in state.instances)

    async def remove_node(self, node_id: str) -> None:
        if node_id not in self.state().nodes:
            raise NodeNotFound(node_id)
        answer = await self._command(m.RemoveNode(node_id))
        match answer.answer:
            case m.Removed():
                pass
            case m.Refused(reason="node_not_found"):
                raise NodeNotFound(node_id)
            case m.Refused(reason="node_answers"):
                raise NodeStillAnswers(node_id)
            case m.Refused(detail=detail):
                raise ClusterUnavailable(detail or "removal refused")
            case other:
                raise ClusterUnavailable(f"unexpected answer to RemoveNode: {type(other).__name__}")
        await self._wait_applied(lambda state: node_id not in state.nodes)

    async def ensure_instance(self, model_id: str, timeout_s: float) -> Instance:
        deadline = time.monotonic() + timeout_s
        instance = self._usable_instance(model_id)
        if instance is None:
            auto_download = self.hub is not None and self.hub.auto_download
            instance = await self._place(model_id, "Pipeline", 1, allow_download=auto_download)
        instance_id = instance.instance_id

        def settled(state: State) -> bool:
            current = state.instances.get(instance_id)
            return current is None or current.status == "failed" or self._servable(current)

        await self.member.replica.wait_for(settled, max(0.0, deadline - time.monotonic()))
        current = self.state().instances.get(instance_id)
        if current is None:
            raise InstanceFailed(instance_id, "deleted while loading")
        if current.status == "failed":
            raise InstanceFailed(instance_id, current.failure_reason or "failed")
        if not self._servable(current):
            raise InstanceNotReady(instance_id, timeout_s)
        return current

    def _servable(self, instance: Instance) -> bool:
        return instance.status == "ready" and self._holds_its_stage(instance)

    def _usable_instance(self, model_id: str) -> Instance | None:
        candidates = [
            instance
            for instance in self.state().instances.values()
            if instance.model_id == model_id and instance.status != "failed"
        ]
        candidates.sort(key=lambda instance: (instance.status != "ready", instance.instance_id))
        return candidates[0] if candidates else None

    # --- inference -----------------------------------------------------------------------------

    def generate(
        self,
        instance: Instance,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
    ) -> TokenStream:
        return self.generator.generate(instance, prompt_tokens, sampling, max_tokens)

    async def tokenizer(self, model_id: str) -> ChatTokenizer:
        hub = self.hub
        if hub is not None and hub.is_hub_id(model_id):
            await hub.ensure_support_files(model_id, allow_download=hub.auto_download)
        return await self.catalog.tokenizer(model_id)

    # --- models (exo.api.model_routes.ModelServices) -----------------------------------------------

    def _hub(self) -> HubModels:
        if self.hub is None:
            raise ModelUnavailable("this node does not fetch models", 503)
        return self.hub

    def model_states(self) -> dict[str, dict[str, NodeModelState]]:
        return self._hub().model_states() if self.hub is not None else {}

    async def download_model(self, model_id: str, node_ids: list[str] | None) -> list[str]:
        return await self._hub().download_model(model_id, node_ids)

    async def delete_model(self, model_id: str) -> list[str]:
        return await self._hub().delete_model(model_id)
