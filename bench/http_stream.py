"""Streaming OpenAI chat completions, timed on the client side: the same code times exo and
`mlx_lm.server`, so their figures differ only by the server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.processes import ProcessFailed

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class StreamTiming:
    """One streamed completion, seen from the client."""

    ttft: float  # request sent -> first chunk with text
    decode_seconds: float  # first chunk with text -> the finish chunk
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens when the server says
    text: str
    ended_at: float  # perf_counter at the finish chunk

    @property
    def decode_tps(self) -> float:
        return (self.completion_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


def chat_body(model: str, messages: Messages, max_tokens: int, eos_ids: Sequence[int]) -> dict[str, Any]:
    """Greedy, with EOS banned through logit_bias so every stream decodes `max_tokens` tokens (the
    synthetic model's random weights would otherwise stop at a random point)."""
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(token): -100 for token in eos_ids},
    }


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> StreamTiming:
    started = time.perf_counter()
    first: float | None = None
    finished: float | None = None
    text: list[str] = []
    usage: dict[str, Any] | None = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:500]
            raise ProcessFailed(f"{url} answered {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk: dict[str, Any] = json.loads(data)
            if "error" in chunk:
                raise ProcessFailed(f"{url} stream failed: {chunk['error']}")
            now = time.perf_counter()
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    text.append(content)
                    if first is None:
                        first = now
                if choice.get("finish_reason") is not None:
                    finished = now
            if chunk.get("usage"):
                usage = chunk["usage"]
    if first is None or finished is None or usage is None:
        raise ProcessFailed(f"{url}: stream ended without text, a finish reason or usage")
    details = usage.get("prompt_tokens_details") or {}
    return StreamTiming(
        ttft=first - started,
        decode_seconds=finished - first,
        completion_tokens=int(usage["completion_tokens"]),
        prompt_tokens=int(usage["prompt_tokens"]),
        cached_tokens=details.get("cached_tokens"),
        text="".join(text),
        ended_at=finished,
    )


@dataclass(frozen=True)
class Concurrent:
    """Several streams sent at once: aggregate tokens per second over the whole batch's wall time."""

    streams: list[StreamTiming]
    wall_seconds: float

    @property
    def aggregate_tps(self) -> float:
        return sum(stream.completion_tokens for stream in self.streams) / self.wall_seconds


async def concurrent_chats(url: str, bodies: Sequence[dict[str, Any]]) -> Concurrent:
    limits = httpx.Limits(max_connections=len(bodies) + 2)
    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        started = time.perf_counter()
        streams = await asyncio.gather(*(stream_chat(client, url, body) for body in bodies))
    return Concurrent(list(streams), max(stream.ended_at for stream in streams) - started)


def one_chat(url: str, body: dict[str, Any]) -> StreamTiming:
    return asyncio.run(concurrent_chats(url, [body])).streams[0]


def many_chats(url: str, bodies: Sequence[dict[str, Any]]) -> Concurrent:
    return asyncio.run(concurrent_chats(url, bodies))
