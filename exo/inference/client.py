"""The requester side of the pipeline, for the node's HTTP layer (asyncio, zmq.asyncio).

One `TokenSink` per node binds the PULL socket that every request's last stage replies to, and
hands each request's `TokenSampled` / `GenerationFailed` to that request's bounded queue.
`PipelineClient.generate(route, request)` starts a generation at route[0] and yields its tokens:

    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)
    async with contextlib.aclosing(client.generate(route, request)) as tokens:
        async for sampled in tokens:
            ...

Closing the iterator early sends `GenerationCancelled`, so every stage frees the request. A dead
stage never hangs a request: each stage announces the requests it holds every second
(`StageAlive`), and a stage silent for `stage_timeout` seconds, a first stage that has not
announced the request within `accept_timeout` of taking it (a runner that died or was stopped with
the request still unread), no token within `token_timeout` (`first_token_timeout` for the first),
or a first stage that cannot be reached within `send_timeout` raises `GenerationError`. Failures
that mean a stage is gone carry `code="unreachable"`: nothing was generated on a dead route, so
the caller may try again once the instance's route has changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from exo.core.decoding import DECODE_ERRORS
from exo.core.sampling import SamplingParams
from exo.core.security import BusSecurity, apply_curve
from exo.core.timings import StageTimings
from exo.inference.protocol import (
    GenerationCancelled,
    GenerationFailed,
    GenerationStarted,
    StageAlive,
    StageTimed,
    TokenSampled,
    encode,
    pipeline_decoder,
)

GRACE_SECONDS = 0.05
TIMED_REQUESTS = 512  # requests whose stages' timings a sink keeps (the newest)
UNREACHABLE = "unreachable"  # GenerationError.code when a stage of the route is gone


class GenerationRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prompt_tokens: list[int]
    max_tokens: int
    eos_token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    request_id: str | None = None  # default: a fresh uuid


class GenerationError(RuntimeError):
    def __init__(
        self, request_id: str, reason: str, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"generation {request_id} failed: {reason}")
        self.request_id = request_id
        self.reason = reason
        self.code = code  # GenerationFailed.code: "busy" when the instance refused it (try later)
        self.retry_after = retry_after


@dataclass
class _RequestChannel:
    queue: asyncio.Queue[TokenSampled | GenerationFailed]
    stage_seen: dict[str, float] = field(default_factory=dict)  # stage address -> loop time
    overflowed: bool = False
    # Until the first stage announces the request (or anything arrives for it): the loop time by
    # which it must, else the stage is taken for dead (unless it is still announcing other
    # requests: busy with a long pass, it reads new ones when the pass ends). None once heard.
    accept_deadline: float | None = None
    first_stage: str = ""


class _StageReports:
    """The stages' timings of one request, as they arrive (one per stage, after its end there)."""

    __slots__ = ("by_stage", "complete")

    def __init__(self) -> None:
        self.by_stage: dict[int, StageTimings] = {}
        self.complete = asyncio.Event()

    def add(self, timings: StageTimings) -> None:
        self.by_stage[timings.stage_index] = timings
        if len(self.by_stage) >= timings.stages:
            self.complete.set()


class TokenSink:
    """The PULL socket a node's requests are answered on, demultiplexed by request id."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        context: zmq.asyncio.Context | None = None,
        queue_size: int = 4096,
        security: BusSecurity | None = None,
    ) -> None:
        self._security = security or BusSecurity()
        self._host = host
        self._advertise_host = advertise_host or host
        self._context = context or zmq.asyncio.Context.instance()
        self._queue_size = queue_size
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._channels: dict[str, _RequestChannel] = {}
        self.address = ""
        self.dropped_frames = 0
        self.stale_frames = 0
        # stage address -> loop time of its last StageAlive (any request): which stages still run
        self.stage_last_alive: dict[str, float] = {}
        self._timings: OrderedDict[str, _StageReports] = OrderedDict()

    async def start(self) -> str:
        socket = self._context.socket(zmq.PULL)
        socket.setsockopt(zmq.LINGER, 0)
        apply_curve(socket, self._security, server=True)
        socket.bind(f"tcp://{self._host}:*")
        endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes)
        self.address = f"tcp://{self._advertise_host}:{endpoint.decode().rsplit(':', 1)[1]}"
        self._socket = socket
        self._task = asyncio.create_task(self._receive(socket), name="token-sink")
        return self.address

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._socket is not None:
            self._socket.close(linger=0)

    def open_channel(self, request_id: str) -> _RequestChannel:
        if request_id in self._channels:
            raise ValueError(f"request id {request_id!r} is already in flight")
        channel = _RequestChannel(queue=asyncio.Queue(self._queue_size))
        self._channels[request_id] = channel
        self._timings[request_id] = _StageReports()
        while len(self._timings) > TIMED_REQUESTS:
            self._timings.popitem(last=False)
        return channel

    async def stage_timings(self, request_id: str, wait: float = 0.0) -> list[StageTimings]:
        """What the stages reported of a request, in stage order, waiting up to `wait` seconds for
        every stage's report (they come as the request ends on each stage, just after its last
        token). Empty for a request this sink no longer remembers."""
        reports = self._timings.get(request_id)
        if reports is None:
            return []
        if wait > 0 and not reports.complete.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await reports.complete.wait()
        return [reports.by_stage[index] for index in sorted(reports.by_stage)]

    def close_channel(self, request_id: str) -> None:
        self._channels.pop(request_id, None)

    async def _receive(self, socket: zmq.asyncio.Socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frames = await socket.recv_multipart()
            self.deliver(frames, loop.time())

    def deliver(self, frames: list[bytes], now: float) -> None:
        """Route one received message (sans-IO: the receive task calls it, so can tests)."""
        if len(frames) != 1:
            self.dropped_frames += 1
            return
        try:
            message = pipeline_decoder.decode(frames[0])
        except DECODE_ERRORS:
            self.dropped_frames += 1
            return
        match message:
            case TokenSampled() | GenerationFailed():
                channel = self._channels.get(message.request_id)
                if channel is None:
                    self.stale_frames += 1
                    return
                channel.accept_deadline = None
                try:
                    channel.queue.put_nowait(message)
                except asyncio.QueueFull:
                    channel.overflowed = True
                if isinstance(message, TokenSampled):
                    for address in channel.stage_seen:  # a token is news from every stage
                        channel.stage_seen[address] = now
            case StageTimed():
                reports = self._timings.get(message.request_id)
                if reports is None or message.timings.stage_index >= message.timings.stages:
                    self.stale_frames += 1
                    return
                reports.add(message.timings)
            case StageAlive():
                if message.stage_address in self.stage_last_alive or len(self.stage_last_alive) < 4096:
                    self.stage_last_alive[message.stage_address] = now
                for request_id in message.request_ids:
                    channel = self._channels.get(request_id)
                    if channel is not None:
                        channel.stage_seen[message.stage_address] = now
                        channel.accept_deadline = None
            case _:
                self.dropped_frames += 1


class PipelineClient:
    def __init__(
        self,
        sink: TokenSink,
        *,
        context: zmq.asyncio.Context | None = None,
        send_timeout: float = 2.0,
        first_token_timeout: float = 300.0,
        token_timeout: float = 60.0,
        stage_timeout: float = 5.0,
        accept_timeout: float = 10.0,
        security: BusSecurity | None = None,
    ) -> None:
        self._security = security or BusSecurity()
        self.sink = sink
        self._context = context or zmq.asyncio.Context.instance()
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self.send_timeout = send_timeout
        self.first_token_timeout = first_token_timeout
        self.token_timeout = token_timeout
        self.stage_timeout = stage_timeout
        # Longer than stage_timeout: a first stage in the middle of a long pass reads (and so
        # announces) a new request only when that pass ends.
        self.accept_timeout = accept_timeout

    async def close(self) -> None:
        for socket in self._sockets.values():
            socket.close(linger=0)
        self._sockets.clear()

    async def _send(self, address: str, frame: bytes, request_id: str) -> None:
        socket = self._sockets.get(address)
        if socket is None:
            socket = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.IMMEDIATE, 1)
            socket.setsockopt(zmq.LINGER, 0)
            apply_curve(socket, self._security, server=False)
            socket.connect(address)
            self._sockets[address] = socket
        writable = await socket.poll(int(self.send_timeout * 1000), zmq.POLLOUT)  # pyright: ignore[reportCallIssue]
        if not writable:
            raise GenerationError(request_id, f"stage {address} is unreachable", UNREACHABLE)
        await socket.send(frame, zmq.NOBLOCK)

    async def cancel(self, route: list[str], request_id: str) -> None:
        """Ask the stages to free a request (best effort: an unreachable stage frees nothing)."""
        with contextlib.suppress(GenerationError, zmq.ZMQError):
            await self._send(route[0], encode(GenerationCancelled(request_id=request_id)), request_id)

    async def generate(
        self, route: list[str], request: GenerationRequest
    ) -> AsyncGenerator[TokenSampled, None]:
        """Tokens of one generation, the last with its finish_reason; GenerationError on failure."""
        if not route:
            raise ValueError("the route needs at least one stage")
        if not self.sink.address:
            raise RuntimeError("start the TokenSink before generating")
        request_id = request.request_id or uuid.uuid4().hex
        started = GenerationStarted(
            request_id=request_id,
            route=list(route),
            reply_to=self.sink.address,
            prompt_tokens=request.prompt_tokens,
            max_tokens=request.max_tokens,
            eos_token_ids=request.eos_token_ids,
            sampling=request.sampling,
        )
        frame = encode(started)
        try:
            pipeline_decoder.decode(frame)  # the stages validate the same way: fail here, not there
        except msgspec.ValidationError as error:
            raise ValueError(f"invalid generation request: {error}") from None
        channel = self.sink.open_channel(request_id)
        completed = False
        try:
            # Set before sending: the announcement may be delivered while the send is awaited.
            channel.accept_deadline = asyncio.get_running_loop().time() + self.accept_timeout
            channel.first_stage = route[0]
            await self._send(route[0], frame, request_id)
            timeout = self.first_token_timeout
            while True:
                message = await self._next(channel, request_id, timeout)
                if isinstance(message, GenerationFailed):
                    raise GenerationError(request_id, message.reason, message.code, message.retry_after)
                yield message
                if message.finish_reason is not None:
                    completed = True
                    return
                timeout = self.token_timeout
        finally:
            self.sink.close_channel(request_id)
            if not completed:  # closed early, failed or timed out: free it on every stage
                await self.cancel(route, request_id)

    async def _next(
        self, channel: _RequestChannel, request_id: str, timeout: float
    ) -> TokenSampled | GenerationFailed:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        rechecked = False
        while True:
            if channel.overflowed:
                raise GenerationError(request_id, "tokens arrive faster than they are read")
            if not channel.queue.empty():
                return channel.queue.get_nowait()
            now = loop.time()
            silent = [
                address for address, seen in channel.stage_seen.items() if now - seen >= self.stage_timeout
            ]
            unaccepted = (
                channel.accept_deadline is not None
                and now >= channel.accept_deadline
                and now - self.sink.stage_last_alive.get(channel.first_stage, -self.stage_timeout)
                >= self.stage_timeout
            )
            if now >= deadline or silent or unaccepted:
                if not rechecked:
                    # If this event loop was itself stalled, heartbeats may be waiting unread in
                    # the sink's socket: let it run once before calling a stage dead.
                    rechecked = True
                    await asyncio.sleep(GRACE_SECONDS)
                    continue
                if silent:
                    raise GenerationError(request_id, f"stage {silent[0]} stopped responding", UNREACHABLE)
                if unaccepted:
                    raise GenerationError(
                        request_id,
                        f"the first stage did not take the request within {self.accept_timeout:g} s",
                        UNREACHABLE,
                    )
                raise GenerationError(request_id, f"no token within {timeout:g} s")
            rechecked = False
            stage_deadline = min(
                (seen + self.stage_timeout for seen in channel.stage_seen.values()), default=deadline
            )
            if channel.accept_deadline is not None:
                busy_until = (
                    self.sink.stage_last_alive.get(channel.first_stage, -self.stage_timeout)
                    + self.stage_timeout
                )
                stage_deadline = min(stage_deadline, max(channel.accept_deadline, busy_until))
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that lands
            # as a token arrives, and the cancelled reader would then hold the request forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(deadline, stage_deadline) - now):
                    return await channel.queue.get()
