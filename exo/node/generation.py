"""Token streams for the HTTP layer: an instance's route, the pipeline client, the API's token type."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import cast

from exo.api.cluster_port import ChatTokenizer, GeneratedToken, GenerationAborted, Overloaded
from exo.core.sampling import SamplingParams
from exo.core.state import Instance, State
from exo.inference.client import UNREACHABLE, GenerationError, GenerationRequest, PipelineClient
from exo.inference.protocol import TokenSampled

# How long a request whose route turned out dead (before any token) waits for a usable one.
ROUTE_RETRY_SECONDS = 20.0


class _RouteGone(Exception):
    """A stage of the route is gone and nothing was generated yet: the request may be retried."""

    def __init__(self, error: GenerationError) -> None:
        super().__init__(error.reason)
        self.error = error


class PipelineGenerator:
    """Generations for the HTTP layer. Several ready instances of one model (placed twice, on
    different nodes) share the load: each generation goes to the one with the fewest generations
    this node has running on it, the instance the request was given on a tie (so an idle node keeps
    a chat on one instance and its prefix cache)."""

    def __init__(
        self,
        client: PipelineClient,
        tokenizer_of: Callable[[str], Awaitable[ChatTokenizer]],
        current_state: Callable[[], State],
        holds_its_stage: Callable[[Instance], bool] | None = None,
        wait_for_state: Callable[[Callable[[State], bool], float], Awaitable[bool]] | None = None,
    ) -> None:
        self.client = client
        self._tokenizer_of = tokenizer_of
        self._current_state = current_state
        # See ClusterServices: an instance whose stage here is a dead runner's is not a candidate.
        self._holds_its_stage = holds_its_stage or (lambda _instance: True)
        # Waits until a predicate of the applied state holds (False on timeout); None: no retries.
        self._wait_for_state = wait_for_state
        self.requests_started = 0
        self.in_flight: Counter[str] = Counter()  # instance id -> generations running from here

    async def generate(
        self,
        instance: Instance,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
    ) -> AsyncGenerator[GeneratedToken, None]:
        deadline = time.monotonic() + ROUTE_RETRY_SECONDS
        while True:
            # Chosen and counted before the first await, so concurrent requests see each other.
            live = self.least_busy(instance)
            route = live.route()
            if route is None:
                raise GenerationAborted(instance.instance_id, f"instance is {live.status}, not ready")
            self.in_flight[live.instance_id] += 1
            stream = self._generate(live, route, prompt_tokens, sampling, max_tokens)
            produced = False
            try:
                # Closed here, at once: closing it is what cancels the request on every stage.
                async with contextlib.aclosing(stream) as tokens:
                    async for token in tokens:
                        produced = True
                        yield token
                return
            except _RouteGone as gone:
                # Nothing was generated: try again once the route has changed (a restarted
                # runner's new address, a re-placed instance), or end now if it cannot.
                if produced or not await self._route_changed(live, route, deadline):
                    raise GenerationAborted(live.instance_id, gone.error.reason) from gone.error
            finally:
                self.in_flight[live.instance_id] -= 1
                if not self.in_flight[live.instance_id]:
                    del self.in_flight[live.instance_id]
            instance = live

    async def _route_changed(self, instance: Instance, route: list[str], deadline: float) -> bool:
        """Wait (until `deadline`) for `instance` to have another route this node can use; False
        when it failed, was deleted or kept its dead route. The log restored after a restart names
        the runners of the nodes' previous processes until each new runner reports ready."""
        if self._wait_for_state is None:
            return False

        def settled(state: State) -> bool:
            current = state.instances.get(instance.instance_id)
            if current is None or current.status != "ready":
                return True
            current_route = current.route()
            return current_route is not None and current_route != route and self._holds_its_stage(current)

        remaining = deadline - time.monotonic()
        if remaining <= 0 or not await self._wait_for_state(settled, remaining):
            return False
        current = self._current_state().instances.get(instance.instance_id)
        if current is not None and current.status == "ready":
            return True
        # Gone or failed: another ready instance of the model (a re-placed one) may serve it.
        replacement = self.least_busy(instance)
        return replacement.instance_id != instance.instance_id and replacement.route() is not None

    def least_busy(self, instance: Instance) -> Instance:
        """The ready instance of `instance`'s model with the fewest generations running from here."""
        instances = self._current_state().instances
        live = instances.get(instance.instance_id, instance)
        ready = [
            candidate
            for candidate in instances.values()
            if candidate.model_id == instance.model_id
            and candidate.route() is not None
            and self._holds_its_stage(candidate)
        ]
        if not ready:
            return live
        return min(
            ready,
            key=lambda candidate: (
                self.in_flight[candidate.instance_id],
                candidate.instance_id != instance.instance_id,
                candidate.instance_id,
            ),
        )

    async def _generate(
        self,
        instance: Instance,
        route: list[str],
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
    ) -> AsyncGenerator[GeneratedToken, None]:
        tokenizer = await self._tokenizer_of(instance.model_id)
        request = GenerationRequest(
            prompt_tokens=list(prompt_tokens),
            max_tokens=max_tokens,
            eos_token_ids=sorted(tokenizer.eos_token_ids),
            sampling=sampling,
            request_id=uuid.uuid4().hex,
        )
        self.requests_started += 1
        # The client's generate is an async generator: closing it cancels the request on every stage.
        stream = cast(AsyncGenerator[TokenSampled, None], self.client.generate(route, request))
        generation_id: str | None = request.request_id  # on the first token only
        async with contextlib.aclosing(stream) as tokens:
            try:
                async for sampled in tokens:
                    yield GeneratedToken(
                        sampled.token,
                        sampled.finish_reason,
                        sampled.logprob,
                        sampled.top_logprobs,
                        sampled.cached_tokens,
                        generation_id,
                    )
                    generation_id = None
            except GenerationError as error:
                if error.code == UNREACHABLE:
                    raise _RouteGone(error) from error
                if error.code == "busy":
                    retry_after = error.retry_after if error.retry_after is not None else 1.0
                    raise Overloaded(instance.instance_id, error.reason, retry_after) from error
                raise GenerationAborted(instance.instance_id, error.reason) from error
            except ValueError as error:  # the client refused the request before sending it
                raise GenerationAborted(instance.instance_id, f"invalid request: {error}") from error
