"""A prepared completion running: one generation per choice, their events merged, cancellable.

Each choice's token stream is read by its own task (a "pump") into one bounded queue; the run's
`events()` decodes them in arrival order. Closing `events()` early (a client gone, a stop string
on every choice) or `cancel()` (POST /v1/cancel/{id}) cancels the pumps, and cancelling a pump
closes its token stream, which sends GenerationCancelled down the pipeline. Pumps are plain
asyncio tasks, outside the server's cancel scope, so that cancellation message still goes out
when the request handler itself is being cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any, NamedTuple, Protocol

import msgspec

from exo.api.channels import OutputSplitter, mlx_lm_parse, model_markers, opens_thinking
from exo.api.cluster_port import ChatTokenizer, GeneratedToken, NodeServices, ServiceError
from exo.api.completion import ChatPrompt, PreparedCompletion
from exo.api.decoding import (
    ChoiceDecoder,
    ChoiceEnded,
    ChoiceEvent,
    Extractor,
    ReasoningDelta,
    TextDelta,
    ToolCallMade,
)
from exo.api.openai_types import PromptTokensDetails, TokenLogprob, Usage
from exo.api.tool_calls import ToolCallExtractor

QUEUE_SLOTS_PER_CHOICE = 64
OPEN_READ_TIMEOUT_S = 30.0  # an opened run nobody starts reading is cancelled after this
_CANCEL_MARK = -1
# Pumps still closing their streams after their run ended: held so they are not collected.
_closing_pumps: set[asyncio.Task[None]] = set()

QueueItem = tuple[int, GeneratedToken | BaseException | None]


class RunEvent(NamedTuple):
    choice: int
    event: ChoiceEvent


class CompletionRun:
    def __init__(
        self,
        services: NodeServices,
        prepared: PreparedCompletion,
        tokenizer: ChatTokenizer,
        *,
        id_prefix: str = "chatcmpl-",
        call_id_prefix: str = "call",
        registry: ActiveCompletions | None = None,
        received_at: float | None = None,
    ) -> None:
        self.completion_id = f"{id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prepared = prepared
        self._services = services
        self._registry = registry
        request = prepared.request
        self.choices = request.n
        tools = request.prompt.tools if isinstance(request.prompt, ChatPrompt) else None
        self.decoders = [
            ChoiceDecoder(
                tokenizer,
                max_tokens=prepared.max_tokens,
                stop_strings=request.stop,
                extractor=extractor_for(tokenizer, prepared),
                parallel_tool_calls=tools.parallel if tools is not None else True,
                call_id_prefix=f"{call_id_prefix}_{uuid.uuid4().hex[:12]}",
            )
            for _ in range(request.n)
        ]
        self._queue: asyncio.Queue[QueueItem] = asyncio.Queue(QUEUE_SLOTS_PER_CHOICE * request.n)
        self._pumps: dict[int, asyncio.Task[None]] = {}
        # Each choice's generation id in the pipeline (its first token says it): its stages' timings.
        self.generation_ids: list[str | None] = [None] * request.n
        self.cancelled = False
        self.started_at = time.monotonic()
        # When the request arrived (before its prompt was prepared): traces start there.
        self.received_at = received_at if received_at is not None else self.started_at
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._started = False
        self._reading = False
        self._primed: QueueItem | None = None  # the first item, taken by open()
        self._abandon: asyncio.TimerHandle | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prepared.prompt_tokens)

    @property
    def completion_tokens(self) -> int:
        return sum(decoder.completion_tokens for decoder in self.decoders)

    @property
    def cached_tokens(self) -> int | None:
        reported = [decoder.cached_tokens for decoder in self.decoders if decoder.cached_tokens is not None]
        return max(reported) if reported else None

    @property
    def usage(self) -> Usage:
        total = self.prompt_tokens + self.completion_tokens
        cached = self.cached_tokens
        details = None if cached is None else PromptTokensDetails(cached)
        return Usage(self.prompt_tokens, self.completion_tokens, total, details)

    async def open(self, receive: Callable[[], Any] | None = None) -> None:
        """Start the generations and wait for the first token, before a streamed answer's headers
        go out: a refusal at admission (an overloaded instance, a stage that fails at once) is then
        a plain HTTP error (503 with Retry-After) that clients retry, not an error event.

        `events()` must follow within OPEN_READ_TIMEOUT_S, else the run is cancelled (the client
        went away before its stream began). With `receive`, a client that disconnects while
        waiting cancels the run.
        """
        self._start()
        watcher = None if receive is None else asyncio.create_task(cancel_on_disconnect(receive, self))
        try:
            self._primed = await self._queue.get()
        finally:
            if watcher is not None:
                watcher.cancel()
        _, item = self._primed
        if isinstance(item, BaseException) and not self.cancelled:
            self._close()
            raise item
        loop = asyncio.get_running_loop()
        self._abandon = loop.call_later(OPEN_READ_TIMEOUT_S, self._cancel_if_unread)

    def _cancel_if_unread(self) -> None:
        if not self._reading:
            self.cancel()
            self._close()

    async def events(self) -> AsyncGenerator[RunEvent, None]:
        """Every choice's events, in arrival order; a ServiceError from a stage is raised here."""
        self._reading = True
        if self._abandon is not None:
            self._abandon.cancel()
        self._start()
        try:
            remaining = set(range(self.choices))
            while remaining:
                if self._primed is not None:
                    (index, item), self._primed = self._primed, None
                else:
                    index, item = await self._queue.get()
                if self.cancelled:
                    for cancelled in sorted(remaining):
                        for event in self.decoders[cancelled].close():
                            yield RunEvent(cancelled, event)
                    return
                if index not in remaining:
                    continue  # a token that was in flight when the choice ended
                decoder = self.decoders[index]
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    events = decoder.close()
                else:
                    now = time.monotonic()
                    self.first_token_at = self.first_token_at or now
                    if self._registry is not None:
                        self._registry.token_arrived(self, now)
                    events = decoder.feed(item)
                for event in events:
                    yield RunEvent(index, event)
                if decoder.ended is not None:
                    remaining.discard(index)
                    self._stop_pump(index)
        finally:
            self._close()

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        if self._registry is not None:
            self._registry.add(self)
        for index in range(self.choices):
            self._start_pump(index)

    def _close(self) -> None:
        self.finished_at = self.finished_at or time.monotonic()
        for index in list(self._pumps):
            self._stop_pump(index)
        if self._registry is not None:
            self._registry.discard(self)

    def cancel(self) -> None:
        """End the run now: every unfinished choice ends as stopped, every stage frees the request."""
        self.cancelled = True
        for index in list(self._pumps):
            self._stop_pump(index)
        self._deliver_now((_CANCEL_MARK, None))

    # --- pumps ----------------------------------------------------------------------------

    def _start_pump(self, index: int) -> None:
        task = asyncio.create_task(self._pump(index), name=f"{self.completion_id}-choice-{index}")
        self._pumps[index] = task
        task.add_done_callback(self._pump_done(index))

    def _stop_pump(self, index: int) -> None:
        task = self._pumps.pop(index, None)
        if task is not None and not task.done():
            _closing_pumps.add(task)
            task.cancel()

    async def _pump(self, index: int) -> None:
        prepared = self.prepared
        sampling = prepared.request.sampling
        if sampling.seed is not None and index:
            sampling = msgspec.structs.replace(sampling, seed=sampling.seed + index)
        try:
            stream = self._services.generate(
                prepared.instance, prepared.prompt_tokens, sampling, prepared.max_tokens
            )
            async with contextlib.aclosing(stream) as tokens:
                async for token in tokens:
                    if self._pumps.get(index) is not asyncio.current_task():
                        return  # stopped, though the cancel did not land: closing the stream frees it
                    if token.generation_id is not None:
                        self.generation_ids[index] = token.generation_id
                    await self._queue.put((index, token))
        except ServiceError as error:
            await self._queue.put((index, error))
            return
        await self._queue.put((index, None))

    def _pump_done(self, index: int) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            _closing_pumps.discard(task)
            if not task.cancelled() and (error := task.exception()) is not None:
                self._deliver_now((index, error))  # a bug: raised from events()

        return done

    def _deliver_now(self, item: QueueItem) -> None:
        while self._queue.full():  # whatever is queued no longer matters
            self._queue.get_nowait()
        self._queue.put_nowait(item)


def extractor_for(tokenizer: ChatTokenizer, prepared: PreparedCompletion) -> Extractor | None:
    """What splits a chat answer: mlx-lm's markers for the model (thinking; calls with the tool
    parser mlx-lm chose), else exo's own call extractor when tools are offered, else nothing."""
    prompt = prepared.request.prompt
    if not isinstance(prompt, ChatPrompt):
        return None
    tools = prompt.tools
    markers = model_markers(tokenizer, tools=tools is not None)
    if markers is not None and (tools is None or markers.tool is not None):
        parse = None if tools is None else mlx_lm_parse(tokenizer, tools.definitions)
        initial = "reasoning" if opens_thinking(tokenizer, prepared.prompt_tokens) else "normal"
        return OutputSplitter(markers, parse, initial)
    return None if tools is None else ToolCallExtractor(prepared.forced_prefix)


class RunObserver(Protocol):
    """Told of every run's start, tokens and end (metrics and traces, exo/api/telemetry.py)."""

    def run_started(self, run: CompletionRun) -> None: ...

    def token_arrived(self, run: CompletionRun, now: float) -> None: ...

    def run_finished(self, run: CompletionRun) -> None: ...


class ActiveCompletions:
    """Runs in progress on this node, by completion id (for POST /v1/cancel/{id})."""

    def __init__(self, observer: RunObserver | None = None) -> None:
        self._runs: dict[str, CompletionRun] = {}
        self._observer = observer

    def __len__(self) -> int:
        return len(self._runs)

    def add(self, run: CompletionRun) -> None:
        self._runs[run.completion_id] = run
        if self._observer is not None:
            self._observer.run_started(run)

    def token_arrived(self, run: CompletionRun, now: float) -> None:
        if self._observer is not None:
            self._observer.token_arrived(run, now)

    def discard(self, run: CompletionRun) -> None:
        if self._runs.get(run.completion_id) is run:
            del self._runs[run.completion_id]
            if self._observer is not None:
                self._observer.run_finished(run)

    def cancel(self, completion_id: str) -> bool:
        run = self._runs.get(completion_id)
        if run is None:
            return False
        run.cancel()
        return True


async def cancel_on_disconnect(receive: Callable[[], Any], run: CompletionRun) -> None:
    """For answers that are not streamed: cancel the run when the client goes away.

    The body has been read, so the next ASGI message is the disconnect (or the end of the
    response, which ends this task first).
    """
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            run.cancel()
            return


class ChoiceResult:
    """One choice of a finished run, for answers that are not streamed."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[ToolCallMade] = []
        self.logprobs: list[TokenLogprob] = []
        self.ended = ChoiceEnded("stop")

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def reasoning_text(self) -> str | None:
        """The separated thinking; None when the model did not think."""
        return "".join(self.reasoning) if self.reasoning else None


async def collect(run: CompletionRun, receive: Callable[[], Any] | None = None) -> list[ChoiceResult]:
    """Run to the end; with the ASGI `receive`, a client that goes away cancels the run."""
    results = [ChoiceResult() for _ in range(run.choices)]
    watcher = None if receive is None else asyncio.create_task(cancel_on_disconnect(receive, run))
    try:
        async with contextlib.aclosing(run.events()) as events:
            async for choice, event in events:
                result = results[choice]
                match event:
                    case TextDelta():
                        result.texts.append(event.text)
                        result.logprobs += event.logprobs
                    case ReasoningDelta():
                        result.reasoning.append(event.text)
                    case ToolCallMade():
                        result.tool_calls.append(event)
                    case ChoiceEnded():
                        result.ended = event
    finally:
        if watcher is not None:
            watcher.cancel()
    return results


def server_sent_event(payload: object, event: str | None = None) -> bytes:
    """One SSE message: `data: <json>` (with `event: <name>` first for Claude's stream)."""
    data = b"data: " + _encoder.encode(payload) + b"\n\n"
    return data if event is None else f"event: {event}\n".encode() + data


_encoder = msgspec.json.Encoder()
