"""Token streams for the HTTP layer: an instance's route, the pipeline client, the API's token type."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import cast

from exo.api.services import ChatTokenizer, GeneratedToken, GenerationFailed, Overloaded
from exo.inference.client import GenerationError, GenerationRequest, PipelineClient
from exo.inference.protocol import SamplingParams, TokenSampled
from exo.state import Instance, State


class PipelineGenerator:
    def __init__(
        self,
        client: PipelineClient,
        tokenizer_of: Callable[[str], Awaitable[ChatTokenizer]],
        current_state: Callable[[], State],
    ) -> None:
        self.client = client
        self._tokenizer_of = tokenizer_of
        self._current_state = current_state
        self.requests_started = 0

    async def generate(
        self,
        instance: Instance,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
    ) -> AsyncIterator[GeneratedToken]:
        live = self._current_state().instances.get(instance.instance_id, instance)
        route = live.route()
        if route is None:
            raise GenerationFailed(instance.instance_id, f"instance is {live.status}, not ready")
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
        async with contextlib.aclosing(stream) as tokens:
            try:
                async for sampled in tokens:
                    yield GeneratedToken(
                        sampled.token,
                        sampled.finish_reason,
                        sampled.logprob,
                        sampled.top_logprobs,
                        sampled.cached_tokens,
                    )
            except GenerationError as error:
                if error.code == "busy":
                    retry_after = error.retry_after if error.retry_after is not None else 1.0
                    raise Overloaded(instance.instance_id, error.reason, retry_after) from error
                raise GenerationFailed(instance.instance_id, error.reason) from error
            except ValueError as error:  # the client refused the request before sending it
                raise GenerationFailed(instance.instance_id, f"invalid request: {error}") from error
