"""An in-memory `NodeServices` with scripted generations, for testing the API without a cluster.

Its tokenizer is character-level (a token id is a code point) with an optional vocabulary of
multi-character tokens, so tests can split text across tokens exactly where they want.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import msgspec

from exo.api.cluster_port import (
    FinishReason,
    GeneratedToken,
    InstanceNotFound,
    ModelNotFound,
    NodeNotFound,
    NodeStillAnswers,
    ServiceError,
)
from exo.core.events import IndexedEvent, ShardAssignment, Sharding
from exo.core.models import ModelFootprint, ModelInfo
from exo.core.placement import PlacementPreview
from exo.core.sampling import SamplingParams
from exo.core.state import Instance, State
from exo.roles.placement import previews

END_OF_SEQUENCE = 0


def model_info(
    model_id: str,
    layer_bytes: list[int],
    architecture: str = "llama",
    supported: bool = True,
    reason: str = "",
) -> ModelInfo:
    """A listed model with these layer sizes (no embedding or head)."""
    return ModelInfo(
        model_id=model_id,
        path=f"/models/{model_id}",
        architecture=architecture,
        n_layers=len(layer_bytes),
        hidden_size=64,
        vocab_size=256,
        dtype="float16",
        total_weight_bytes=sum(layer_bytes),
        layer_bytes=layer_bytes,
        embedding_bytes=0,
        head_bytes=0,
        other_bytes=0,
        tied_embeddings=False,
        supported=supported,
        reason=reason,
    )


class FakeDetokenizer:
    def __init__(self, vocabulary: dict[int, str]) -> None:
        self._vocabulary = vocabulary
        self._text = ""
        self._offset = 0

    def add_token(self, token: int) -> None:
        self._text += self._vocabulary.get(token, chr(token))

    def finalize(self) -> None:
        pass

    @property
    def last_segment(self) -> str:
        segment = self._text[self._offset :]
        self._offset = len(self._text)
        return segment


class FakeTokenizer:
    """Renders `<role>content` per message (and `<tools>[...]` when tools are given and
    `renders_tools` is on); a token id is a code point unless the vocabulary says otherwise."""

    def __init__(self, vocabulary: dict[int, str] | None = None) -> None:
        self.vocabulary = vocabulary or {}
        self.refuse_with: Exception | None = None
        self.renders_tools = True
        self.chat_template: str | None = "<fake template>"
        self.rendered: list[list[dict[str, Any]]] = []  # every conversation it was asked to render
        self.template_options: list[dict[str, Any]] = []  # and the template variables with each

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        *,
        tokenize: bool,
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
        **template_options: Any,
    ) -> list[int]:
        if self.refuse_with is not None:
            raise self.refuse_with
        self.rendered.append(conversation)
        self.template_options.append(template_options)
        text = ""
        if tools and self.renders_tools:
            text += "<tools>" + json.dumps(tools) + "</tools>"
        text += "".join(f"<{message['role']}>{message['content']}" for message in conversation)
        if add_generation_prompt:
            text += "<assistant>"
        return [ord(character) for character in text]  # one token per character, whatever the vocabulary

    @property
    def detokenizer(self) -> FakeDetokenizer:
        return FakeDetokenizer(self.vocabulary)

    @property
    def eos_token_ids(self) -> set[int]:
        return {END_OF_SEQUENCE}

    def decode(self, token_ids: list[int]) -> str:
        return "".join(self.vocabulary.get(token, chr(token)) for token in token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`: vocabulary entries where they match, else one code point each."""
        by_text = {piece: token for token, piece in self.vocabulary.items()}
        tokens: list[int] = []
        position = 0
        while position < len(text):
            match = max(
                (piece for piece in by_text if text.startswith(piece, position)), key=len, default=None
            )
            if match is None:
                tokens.append(ord(text[position]))
                position += 1
            else:
                tokens.append(by_text[match])
                position += len(match)
        return tokens


class GenerateCall(msgspec.Struct):
    instance_id: str
    prompt_tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    tokens_sent: int = 0
    closed_early: bool = False
    finished: bool = False


class FakeNodeServices:
    """Scripted answers. Set `script` to the tokens the next generations yield (an exception in it
    is raised at that point), and the `*_error` fields to make a method fail."""

    def __init__(self, node_id: str = "node0", state: State | None = None) -> None:
        self._node_id = node_id
        self.current_state = state or State()
        self.indexed_events: list[IndexedEvent] = []
        self.model_infos = [model_info("exo-tiny", [1000] * 8)]
        self.tokenizers = {"exo-tiny": FakeTokenizer()}
        self.status: dict[str, object] = {"node_id": node_id, "uptime_s": 1.5, "dropped_frames": {"bus": 0}}
        self.script: list[int | ServiceError] = []
        # After the script: end with end-of-sequence (True) or stop yielding with no finish reason.
        self.end_with_eos = True
        self.place_error: ServiceError | None = None
        self.ensure_error: ServiceError | None = None
        self.generate_calls: list[GenerateCall] = []
        self.ensure_timeouts: list[float] = []
        self.answering: set[str] = set()  # nodes remove_node refuses as still answering
        self.generation_closed = asyncio.Event()
        # Seconds between scripted tokens: a real generation takes time, so a consumer that stops
        # early (a stop string, a cancel) does so while the generation is still running.
        self.token_interval = 0.002
        self.cached_tokens: int | None = None  # what the prefix cache reports on the first token
        self._next_instance = 1

    @property
    def node_id(self) -> str:
        return self._node_id

    def state(self) -> State:
        return self.current_state

    async def events_since(self, index: int, limit: int) -> list[IndexedEvent]:
        return [event for event in self.indexed_events if event.index > index][:limit]

    def node_status(self) -> dict[str, object]:
        return self.status

    def models(self) -> list[ModelInfo]:
        return self.model_infos

    async def place_instance(self, model_id: str, sharding: Sharding, min_nodes: int) -> Instance:
        self._check_model(model_id)
        if self.place_error is not None:
            raise self.place_error
        n_layers = self._model(model_id).n_layers
        instance = Instance(
            instance_id=f"i-{self._next_instance}",
            model_id=model_id,
            sharding=sharding,
            status="placing",
            shard_assignments={self._node_id: ShardAssignment(0, n_layers, n_layers)},
        )
        self._next_instance += 1
        self._put_instance(instance)
        return instance

    async def previews(self, model_id: str) -> list[PlacementPreview]:
        self._check_model(model_id)
        footprint = ModelFootprint.of_model(self._model(model_id))
        return previews(footprint, self.current_state.nodes.values())

    async def delete_instance(self, instance_id: str) -> None:
        if instance_id not in self.current_state.instances:
            raise InstanceNotFound(instance_id)
        instances = {key: value for key, value in self.current_state.instances.items() if key != instance_id}
        self.current_state = msgspec.structs.replace(self.current_state, instances=instances)

    async def remove_node(self, node_id: str) -> None:
        if node_id not in self.current_state.nodes:
            raise NodeNotFound(node_id)
        if node_id in self.answering:
            raise NodeStillAnswers(node_id)
        nodes = {key: value for key, value in self.current_state.nodes.items() if key != node_id}
        self.current_state = msgspec.structs.replace(self.current_state, nodes=nodes)

    async def ensure_instance(self, model_id: str, timeout_s: float) -> Instance:
        self._check_model(model_id)
        self.ensure_timeouts.append(timeout_s)
        if self.ensure_error is not None:
            raise self.ensure_error
        for instance in self.current_state.instances.values():
            if instance.model_id == model_id and instance.status == "ready":
                return instance
        placed = await self.place_instance(model_id, "Pipeline", 1)
        ready = msgspec.structs.replace(placed, status="ready")
        self._put_instance(ready)
        return ready

    def generate(
        self, instance: Instance, prompt_tokens: Sequence[int], sampling: SamplingParams, max_tokens: int
    ) -> AsyncGenerator[GeneratedToken, None]:
        call = GenerateCall(instance.instance_id, list(prompt_tokens), sampling, max_tokens)
        self.generate_calls.append(call)
        return self._generate(call, list(self.script))

    async def tokenizer(self, model_id: str) -> FakeTokenizer:
        self._check_model(model_id)
        return self.tokenizers[model_id]

    async def _generate(
        self, call: GenerateCall, script: list[int | ServiceError]
    ) -> AsyncGenerator[GeneratedToken, None]:
        try:
            for item in script:
                await asyncio.sleep(self.token_interval)
                if isinstance(item, ServiceError):
                    raise item
                call.tokens_sent += 1
                if call.tokens_sent == call.max_tokens:
                    call.finished = True
                    yield self._token(call, item, "length")
                    return
                yield self._token(call, item, None)
            call.finished = True
            if self.end_with_eos:
                call.tokens_sent += 1
                yield self._token(call, END_OF_SEQUENCE, "stop")
        except (GeneratorExit, asyncio.CancelledError):
            # Closed (or its reader cancelled) after the last token is normal; before it, it
            # cancels the generation.
            call.closed_early = not call.finished
            raise
        finally:
            self.generation_closed.set()

    def _token(self, call: GenerateCall, token: int, finish_reason: FinishReason | None) -> GeneratedToken:
        """With logprobs on: -0.5 for the token, alternatives at -1.5, -2.5... The first token
        carries `cached_tokens` when set."""
        cached = self.cached_tokens if call.tokens_sent == 1 else None
        if not call.sampling.logprobs:
            return GeneratedToken(token, finish_reason, cached_tokens=cached)
        alternatives = [(token, -0.5)] + [(ord("a") + rank, -1.5 - rank) for rank in range(19)]
        top = alternatives[: call.sampling.top_logprobs]
        return GeneratedToken(token, finish_reason, -0.5, top, cached_tokens=cached)

    def _check_model(self, model_id: str) -> None:
        self._model(model_id)

    def _model(self, model_id: str) -> ModelInfo:
        for model in self.model_infos:
            if model.model_id == model_id:
                return model
        raise ModelNotFound(model_id)

    def _put_instance(self, instance: Instance) -> None:
        instances = {**self.current_state.instances, instance.instance_id: instance}
        self.current_state = msgspec.structs.replace(self.current_state, instances=instances)
