"""The pipeline stage engine: what a runner does with each frame, without any sockets.

`PipelineStage.handle_frames` takes one received multipart frame and returns the frames to send;
`run_next` runs one forward pass (a prefill chunk, or the single-token steps of several requests
batched) and returns the frames its result produces. The runner's shell owns the sockets and the
loop; everything here is testable by calling it.

Per request, every stage keeps its own KV cache. The first stage turns the prompt into chunks the
way mlx-lm's generate_step does (all but the last token in chunks of `prefill_step_size`, then the
last token alone), so a request running alone computes exactly what mlx-lm computes and greedy
output matches token for token. The last stage samples, sends `TokenSampled` to the requester and
to the first stage, which feeds the token back in as the next step's input.

The first stage also admits requests (at most `max_active_requests` at once, then a bounded
waiting queue, then refusals with code "busy") and owns the prefix cache's decisions
(exo/inference/prefix_cache.py): a hit is announced in the forwarded `GenerationStarted`, and a
finished request's cache is kept on every stage by a `PrefixCached` that follows it down the route.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import msgspec

from exo.inference.batching import enable_row_attention
from exo.inference.frames import (
    Buffer,
    MalformedFrameError,
    Outgoing,
    activations_problem,
    decode_frames,
    hidden_from_wire,
    prefill_chunks,
    start_problem,
)
from exo.inference.grammar import GrammarError, make_constraint
from exo.inference.pass_threads import PassThreads
from exo.inference.prefix_cache import StagePrefixCache
from exo.inference.protocol import (
    ActivationsSent,
    BatchRow,
    GenerationCancelled,
    GenerationFailed,
    GenerationStarted,
    PipelineMessage,
    PrefixCacheConfirmed,
    PrefixCached,
    StageAlive,
    StageTimed,
    TokenSampled,
    encode,
)
from exo.inference.request_state import RequestState, StageCounters
from exo.inference.sampling import SampledToken, TokenSampler
from exo.inference.scheduler import AdmissionQueue, StageScheduler, Work, micro_batch_limit
from exo.inference.shard import ShardModel
from exo.inference.stage_passes import LaunchedPass, launch_pass
from exo.inference.timings import RequestTimings

__all__ = ["Outgoing", "PipelineStage", "RequestState", "StageCounters", "prefill_chunks"]


class PipelineStage:
    def __init__(
        self,
        shard: ShardModel,
        address: str,
        *,
        prefill_step_size: int = 2048,
        max_active_requests: int = 64,
        max_waiting_requests: int = 64,
        max_batch_size: int = 32,
        prefix_cache_tokens: int = 8192,
        retry_after: float = 1.0,
        pass_threads: PassThreads | None = None,
    ) -> None:
        self.shard = shard
        self.pass_threads = pass_threads
        self.address = address
        self.prefill_step_size = prefill_step_size
        self.max_active_requests = max_active_requests
        self.retry_after = retry_after
        self.requests: dict[str, RequestState] = {}
        self.scheduler = StageScheduler()
        self.in_flight: LaunchedPass | None = None  # launched, its result not yet taken
        self.last_ready = 0.0  # perf_counter when the last pass's result was taken (for traces)
        self._arrived: dict[str, float] = {}  # first stage: when each waiting request arrived
        self.counters = StageCounters()
        self.fatal_error: str | None = None  # set when this stage can serve nothing more
        # Why a tensor rank's pass was broken off (its watchdog cut the ring): said instead of MLX's
        # "connection lost", which would blame a peer that is alive but frozen.
        self.interrupted_because: str | None = None
        self.admission: AdmissionQueue[GenerationStarted] = AdmissionQueue(
            max_active_requests, max_waiting_requests
        )
        self.max_batch_size = max_batch_size if max_batch_size > 1 and enable_row_attention(shard) else 1
        self.prefix = StagePrefixCache(
            first=shard.spec.is_first, budget_tokens=prefix_cache_tokens, max_parked=max_active_requests
        )

    # --- receiving ----------------------------------------------------------------------

    def handle_frames(self, frames: Sequence[Buffer]) -> list[Outgoing]:
        """One received multipart message; malformed ones are counted and dropped."""
        try:
            message, buffer = decode_frames(frames)
        except MalformedFrameError:
            self.counters.dropped_frames += 1
            return []
        return self.handle(message, buffer)

    def handle(self, message: PipelineMessage, buffer: Buffer | None = None) -> list[Outgoing]:
        outgoing = self._dispatch(message, buffer)
        return outgoing + self._admit_waiting()

    def _dispatch(self, message: PipelineMessage, buffer: Buffer | None) -> list[Outgoing]:
        match message:
            case GenerationStarted():
                return self._start(message)
            case ActivationsSent():
                assert buffer is not None
                return self._activations(message, buffer)
            case TokenSampled():
                return self._token(message)
            case GenerationCancelled():
                return self._cancel(message)
            case PrefixCached():
                return self._prefix_cached(message)
            case PrefixCacheConfirmed():
                if self.prefix.index is None or not self.prefix.index.confirm(message.request_id):
                    self.counters.stale_frames += 1
                return []
            case GenerationFailed() | StageAlive() | StageTimed():
                self.counters.dropped_frames += 1  # addressed to requesters, never to a stage
                return []

    def _fail(
        self, request_id: str, reply_to: str, reason: str, *, busy: bool = False, gone: bool = False
    ) -> list[Outgoing]:
        failed = GenerationFailed(
            request_id=request_id,
            reason=reason,
            stage_address=self.address,
            code="busy" if busy else "unreachable" if gone else None,
            retry_after=self.retry_after if busy else None,
        )
        return [Outgoing(reply_to, (encode(failed),), request_id, to_requester=True)]

    def _start(self, message: GenerationStarted) -> list[Outgoing]:
        request_id = message.request_id
        if request_id in self.requests or request_id in self.admission or request_id in self.prefix:
            self.counters.dropped_frames += 1  # a second start would corrupt the first's cache
            return []
        problem = start_problem(message, self.shard.spec, self.shard.vocab_size, self.address)
        if problem is not None:
            return self._fail(request_id, message.reply_to, problem)
        if not self.shard.spec.is_first:
            if len(self.requests) >= self.max_active_requests:
                return self._fail(
                    request_id, message.reply_to, f"stage busy: {len(self.requests)} requests", busy=True
                )
            return self._begin(message)
        match self.admission.offer(request_id, message):
            case "admitted":
                return self._begin(message)
            case "waiting":
                self._arrived[request_id] = time.perf_counter()
                return []
            case "refused":
                return self._fail(
                    request_id,
                    message.reply_to,
                    f"instance busy: {len(self.admission.active)} requests running and "
                    f"{len(self.admission.waiting)} waiting",
                    busy=True,
                )

    def _admit_waiting(self) -> list[Outgoing]:
        outgoing: list[Outgoing] = []
        for message in self.admission.admit_waiting():
            outgoing.extend(self._begin(message))
        return outgoing

    def _begin(self, message: GenerationStarted) -> list[Outgoing]:
        spec, request_id, index = self.shard.spec, message.request_id, message.stage_index
        begun = time.perf_counter()
        timings = RequestTimings(self._arrived.pop(request_id, begun), begun)
        forwarded = msgspec.structs.replace(message, stage_index=index + 1)
        cache: list[Any] | None = None
        if spec.is_first and self.prefix.index is not None:
            found = self.prefix.hit(message.route, message.prompt_tokens)
            if found is not None:
                (entry_id, tokens), cache = found
                forwarded = msgspec.structs.replace(forwarded, prefix_entry=entry_id, cached_tokens=tokens)
            forwarded = msgspec.structs.replace(forwarded, store_prefix=len(message.route) > 1)
        elif message.prefix_entry is not None:
            cache = self.prefix.snapshots.restore(message.prefix_entry, message.cached_tokens)
            if cache is None:  # the first stage uses confirmed entries only: this is a bug, say so
                return self._fail(
                    request_id, message.reply_to, f"prefix cache entry {message.prefix_entry} missing here"
                )
        sampler: TokenSampler | None = None
        if spec.is_last:
            try:
                sampler = self._sampler(message)
            except GrammarError as error:
                return self._fail(request_id, message.reply_to, str(error))
        state = RequestState(
            request_id=request_id,
            route=list(message.route),
            reply_to=message.reply_to,
            stage_index=index,
            max_tokens=message.max_tokens,
            eos_token_ids=frozenset(message.eos_token_ids),
            cache=cache if cache is not None else self.shard.make_cache(),
            sampler=sampler,
            cached_tokens=forwarded.cached_tokens,
            store_prefix=forwarded.store_prefix,
            tokens=list(message.prompt_tokens) if spec.is_first else [],
            timings=timings,
        )
        self.requests[request_id] = state
        self.counters.requests_started += 1
        if state.cached_tokens:
            self.counters.prefix_cache_hits += 1
            self.counters.cached_prompt_tokens += state.cached_tokens
        outgoing: list[Outgoing] = []
        if state.next_address is not None:
            outgoing.append(Outgoing(state.next_address, (encode(forwarded),), request_id))
        if spec.is_first:
            tokens = message.prompt_tokens
            spans = prefill_chunks(len(tokens), self.prefill_step_size, start=state.cached_tokens)
            for position, (start, end) in enumerate(spans):
                last = position == len(spans) - 1
                chunk = mx.array(tokens[start:end])[None]
                self.scheduler.submit(
                    Work(
                        request_id,
                        0,
                        chunk,
                        sample=last,
                        batchable=last and end - start == 1,
                        tokens=end - start,
                    )
                )
        return outgoing

    def _sampler(self, message: GenerationStarted) -> TokenSampler:
        """The last stage's sampler for a request, with its grammar when it has one."""
        grammar = message.sampling.grammar
        constraint = None
        if grammar is not None:
            constraint = make_constraint(
                grammar, self.shard.model_path, self.shard.vocab_size, message.eos_token_ids
            )
        return TokenSampler(message.sampling, message.prompt_tokens, constraint)

    def _activations(self, message: ActivationsSent, buffer: Buffer) -> list[Outgoing]:
        if self.shard.spec.is_first:
            self.counters.dropped_frames += 1
            return []
        if activations_problem(message, memoryview(buffer).nbytes, self.shard.hidden_size) is not None:
            self.counters.dropped_frames += 1
            return []
        hidden = hidden_from_wire(buffer, message.shape, message.dtype)
        rows = [BatchRow(message.request_id, message.step), *message.batch]
        batchable = message.sample and message.shape[1] == 1
        for position, row in enumerate(rows):
            if row.request_id not in self.requests:
                self.counters.stale_frames += 1
                continue
            inputs = hidden if len(rows) == 1 else hidden[position : position + 1]
            self.scheduler.submit(
                Work(row.request_id, row.step, inputs, message.sample, batchable, tokens=message.shape[1])
            )
        return []

    def _token(self, message: TokenSampled) -> list[Outgoing]:
        state = self.requests.get(message.request_id)
        if state is None:
            self.counters.stale_frames += 1
            return []
        if self.shard.spec.is_first:
            state.timings.returned(message.step, time.perf_counter())
        if message.finish_reason is not None:
            return self._release(state, message)
        if not self.shard.spec.is_first:
            self.counters.dropped_frames += 1
            return []
        self._feed(state, message.step + 1, message.token)
        return []

    def _feed(self, state: RequestState, step: int, token: int) -> None:
        """First stage: the sampled token is the next step's input."""
        state.tokens.append(token)
        self.scheduler.submit(Work(state.request_id, step, mx.array([[token]]), sample=True, batchable=True))

    def _cancel(self, message: GenerationCancelled) -> list[Outgoing]:
        if message.request_id in self.admission.waiting:
            self.admission.end(message.request_id)  # no other stage has seen it
            self._arrived.pop(message.request_id, None)
            return []
        if self.prefix.unpark(message.request_id) is not None:
            return []
        state = self.requests.get(message.request_id)
        if state is None:
            self.counters.stale_frames += 1
            return []
        return self._release(state, message)

    def _release(self, state: RequestState, message: TokenSampled | GenerationCancelled) -> list[Outgoing]:
        """Free the request here and pass the news on; the last stage frees itself when it finishes.
        A finished request's cache may first become a prefix cache entry."""
        outgoing: list[Outgoing] = []
        finished = isinstance(message, TokenSampled)
        if finished and state.store_prefix and self.shard.spec.is_first:
            stored = self._store_prefix(state)
            if stored is not None:
                outgoing.append(Outgoing(state.route[1], (encode(stored),), state.request_id))
        self.drop_request(state.request_id)
        following = state.stage_index + 1
        if following < len(state.route) and not (finished and following == len(state.route) - 1):
            outgoing.append(Outgoing(state.route[following], (encode(message),), state.request_id))
        outgoing.append(self._timed(state))
        return outgoing

    def _timed(self, state: RequestState) -> Outgoing:
        """The request's timings on this stage, for its requester's trace (once, as it ends here)."""
        timings = state.timings.report(state.stage_index, len(state.route), self.address)
        report = StageTimed(request_id=state.request_id, timings=timings)
        return Outgoing(state.reply_to, (encode(report),), state.request_id, to_requester=True)

    def _store_prefix(self, state: RequestState) -> PrefixCached | None:
        """First stage, a request that ended normally: its cache may become a prefix entry."""
        held = state.tokens[: state.cache[0].offset if state.cache else 0]
        return self.prefix.store(state.request_id, state.route, held, state.cache)

    def _prefix_cached(self, message: PrefixCached) -> list[Outgoing]:
        index, route = message.stage_index, message.route
        if (
            self.shard.spec.is_first
            or index >= len(route)
            or (index == len(route) - 1) != self.shard.spec.is_last
        ):
            self.counters.dropped_frames += 1
            return []
        state = self.requests.get(message.request_id)
        following = self.prefix.apply(message, state.cache if state is not None else None, self.address)
        if following is None:
            return []
        address = route[0] if isinstance(following, PrefixCacheConfirmed) else route[index + 1]
        return [Outgoing(address, (encode(following),), message.request_id)]

    def drop_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.scheduler.drop_request(request_id)
        self.admission.end(request_id)

    def _abort(self, state: RequestState, reason: str, *, gone: bool = False) -> list[Outgoing]:
        """Free a request that cannot go on; tell its requester, and the stages after this one
        (the requester's cancel reaches those before it, and stops here). `gone`: because a stage
        of its route is gone, so nothing was or will be generated on it."""
        self.drop_request(state.request_id)
        outgoing = self._fail(state.request_id, state.reply_to, reason, gone=gone)
        if state.next_address is not None:
            cancelled = encode(GenerationCancelled(request_id=state.request_id))
            outgoing.append(Outgoing(state.next_address, (cancelled,), state.request_id))
        return outgoing

    def fail_all(self, reason: str) -> list[Outgoing]:
        """Free every request held or waiting here and tell each requester why (the runner is
        stopping: a request it drops silently would be waited on until a timeout)."""
        return self._end_all(reason, gone=True)

    def abort_all(self, reason: str) -> list[Outgoing]:
        """Fail every request held or waiting here (the stage can serve nothing more)."""
        return self._end_all(reason, gone=False)

    def _end_all(self, reason: str, *, gone: bool) -> list[Outgoing]:
        outgoing: list[Outgoing] = []
        for state in list(self.requests.values()):
            outgoing.extend(self._abort(state, reason, gone=gone))
        for message in list(self.admission.waiting.values()):
            self.admission.end(message.request_id)
            self._arrived.pop(message.request_id, None)
            outgoing.extend(self._fail(message.request_id, message.reply_to, reason, gone=gone))
        return outgoing

    def send_failed(self, item: Outgoing) -> list[Outgoing]:
        """The shell could not deliver `item`; decide what that means for its requests."""
        outgoing: list[Outgoing] = []
        for request_id in (item.request_id, *item.batch_request_ids):
            state = self.requests.get(request_id)
            if state is None:
                continue
            if not item.to_requester:
                outgoing.extend(self._abort(state, f"stage {item.address} is unreachable", gone=True))
                continue
            # The requester is gone: free the request everywhere, starting from the first stage.
            self.drop_request(state.request_id)
            if state.stage_index != 0:
                cancelled = encode(GenerationCancelled(request_id=state.request_id))
                outgoing.append(Outgoing(state.route[0], (cancelled,), state.request_id))
        return outgoing + self._admit_waiting()

    # --- computing ----------------------------------------------------------------------

    def has_work(self) -> bool:
        return len(self.scheduler) > 0 or self.in_flight is not None

    def batch_limit(self) -> int:
        if self.max_batch_size == 1 or not self.shard.spec.is_first:
            return self.max_batch_size
        depth = max((len(state.route) for state in self.requests.values()), default=1)
        return micro_batch_limit(self.max_batch_size, len(self.requests), depth)

    def run_next(self) -> list[Outgoing]:
        """Launch the next pass, then finish the one launched before it: MLX computes that one
        while this one's graph is built (as mlx-lm's generate_step overlaps its steps).

        Only a pass whose requests' next steps were fed ahead stays in flight past this call.
        Any other is finished here too: a pipeline stage that returned early would launch the
        rows of its next micro-batch as they trickle in, in several smaller passes that each read
        all the weights (8 streams over 2 stages lost a quarter of their throughput that way)."""
        launched, failed = self._launch_next()
        outgoing = failed + self._finish_in_flight()
        self.in_flight = launched
        if launched is not None and not launched.fed_ahead:
            outgoing.extend(self._finish_in_flight())
        return outgoing + self._admit_waiting()

    def _launch_next(self) -> tuple[LaunchedPass | None, list[Outgoing]]:
        batch = [
            (self.requests[work.request_id], work)
            for work in self.scheduler.next_batch(self.batch_limit(), self.prefill_step_size)
            if work.request_id in self.requests
        ]
        if not batch:
            return None, []
        if self.pass_threads is not None:
            self.pass_threads.before_pass(len(batch), batch[0][1].tokens)
        launching = time.perf_counter()
        try:
            launched = launch_pass(self.shard, batch, self.counters)
        except (RuntimeError, ValueError, MemoryError) as error:
            return None, self._abort_batch(batch, error)
        launched.launched_at = launching
        if launched.drawn is not None and self.shard.spec.is_first:
            self._feed_ahead(launched)
        return launched, []

    def _feed_ahead(self, launched: LaunchedPass) -> None:
        """One stage samples and embeds: queue each request's next step on its token before the
        token is computed, unless the request ends at this length or its sampler needs every
        token accepted before the next draw. A request that then stops at this token (EOS) has
        one step too many computed, thrown away with the request."""
        for row, (state, work) in enumerate(launched.batch):
            assert state.sampler is not None
            if work.step + 1 >= state.max_tokens or state.sampler.depends_on_output:
                continue
            self.scheduler.submit(
                Work(state.request_id, work.step + 1, launched.next_input(row), sample=True, batchable=True)
            )
            launched.fed_ahead.add(state.request_id)

    def _finish_in_flight(self) -> list[Outgoing]:
        launched, self.in_flight = self.in_flight, None
        if launched is None:
            return []
        try:
            result = launched.finish()
        except (RuntimeError, ValueError, MemoryError) as error:
            held = [row for row in launched.batch if self.requests.get(row[0].request_id) is row[0]]
            return self._abort_batch(held, error)
        outgoing = list(result.outgoing)
        self._timed_pass(launched, result.accept_s)
        for (state, work), sampled_token in zip(launched.batch, result.sampled, strict=False):
            if self.requests.get(state.request_id) is state:  # not cancelled meanwhile
                fed_ahead = state.request_id in launched.fed_ahead
                outgoing.extend(self._sampled(state, work, sampled_token, fed_ahead=fed_ahead))
        self.counters.largest_batch = max(self.counters.largest_batch, len(launched.batch))
        self.counters.steps_done += 1
        return outgoing

    def _timed_pass(self, launched: LaunchedPass, accept_s: float) -> None:
        """Record a finished pass for each of its requests: it ran from when it was launched, or
        from when the pass before it finished if it was launched during that one."""
        ready = time.perf_counter()
        started, self.last_ready = max(launched.launched_at, self.last_ready), ready
        sample_s = launched.draw_s + accept_s
        sends_on = self.shard.spec.is_first and not self.shard.spec.is_last  # waits for its token
        for state, work in launched.batch:
            if self.requests.get(state.request_id) is state:
                state.timings.passed(
                    work.step, work.sample, queued_at=work.queued_at, started=started, ready=ready,
                    sample_s=sample_s,
                )  # fmt: skip
                if sends_on and work.sample:
                    state.timings.sent(work.step, ready)

    def _abort_batch(self, batch: list[tuple[RequestState, Work]], error: Exception) -> list[Outgoing]:
        # MLX reports allocation failures and shape errors this way; the requests cannot go on.
        if self.shard.tensor_group is not None:
            # A tensor rank's failed pass (a lost ring peer, or one rank failing where others did
            # not) leaves the ranks out of step: the runner must stop, not take the next request.
            self.fatal_error = self.interrupted_because or f"tensor pass failed: {error}"
        why = self.interrupted_because or error
        outgoing: list[Outgoing] = []
        for state, _ in batch:
            outgoing.extend(self._abort(state, f"stage {self.address} failed: {why}"))
        return outgoing

    def _sampled(
        self, state: RequestState, work: Work, sampled_token: SampledToken, *, fed_ahead: bool = False
    ) -> list[Outgoing]:
        token = sampled_token.token
        state.tokens_sampled += 1
        self.counters.tokens_sampled += 1
        finish_reason = None
        if token in state.eos_token_ids:
            finish_reason = "stop"
        elif work.step + 1 >= state.max_tokens:
            finish_reason = "length"
        sampled = TokenSampled(
            request_id=state.request_id,
            step=work.step,
            token=token,
            finish_reason=finish_reason,
            logprob=sampled_token.logprob,
            top_logprobs=sampled_token.top_logprobs,
            cached_tokens=state.cached_tokens,
        )
        frame = encode(sampled)
        outgoing = [Outgoing(state.reply_to, (frame,), state.request_id, to_requester=True)]
        first = self.shard.spec.is_first
        if first and fed_ahead:
            state.tokens.append(token)  # its step is queued already (and may be computed)
        if finish_reason is not None:
            if first and self.prefix.index is not None:
                self._store_prefix(state)  # one stage: nothing to tell anyone
            self.drop_request(state.request_id)
            if not first:
                if state.store_prefix:
                    self.prefix.park(state.request_id, state.cache)
                outgoing.append(Outgoing(state.route[0], (frame,), state.request_id))
            outgoing.append(self._timed(state))
        elif first and not fed_ahead:
            self._feed(state, work.step + 1, token)
        elif not first:
            # the first stage's copy first: the next step waits for it, the requester does not
            outgoing.insert(0, Outgoing(state.route[0], (frame,), state.request_id))
        return outgoing

    # --- reporting ----------------------------------------------------------------------

    def requests_by_requester(self) -> dict[str, list[str]]:
        """reply_to address -> ids of the requests this stage holds for it (for StageAlive),
        waiting ones included."""
        by_requester: dict[str, list[str]] = {}
        for state in self.requests.values():
            by_requester.setdefault(state.reply_to, []).append(state.request_id)
        for message in self.admission.waiting.values():
            by_requester.setdefault(message.reply_to, []).append(message.request_id)
        return by_requester
