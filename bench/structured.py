"""Constrained decoding's cost: the same exo instance decoding with a `json_schema` and without.

One node holds one instance of the model. Each round measures, in an order that rotates per round:
one stream with a schema and one without, then N concurrent streams with a schema each and N
without. The schema's one string must be at least 2000 characters, so every constrained stream
decodes to `max_tokens` like the free one (greedy, EOS banned), and every token goes through the
grammar's mask.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.http_stream import chat_body, many_chats, one_chat
from bench.processes import ExoCluster, ProcessFailed
from bench.rounds import Interleaved
from bench.suite import Row, at_least
from bench.workload import ModelUnderTest, Settings, user_messages

SETUPS = ("free1", "schema1", "freeN", "schemaN")
SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
    "additionalProperties": False,
}


def with_schema(body: dict[str, Any]) -> dict[str, Any]:
    schema = {"name": "story", "schema": SCHEMA, "strict": True}
    return {**body, "response_format": {"type": "json_schema", "json_schema": schema}}


def run_structured(model: ModelUnderTest, settings: Settings, root: Path) -> tuple[list[Row], str]:
    rounds = Interleaved("structured")
    with contextlib.ExitStack() as stack:
        cluster = ExoCluster(root / "structured", model.path.parent, 1)
        stack.callback(cluster.stop)
        try:
            cluster.start()
            url = cluster.entry_url(cluster.place(model.path.name, 1))
        except ProcessFailed as error:
            for setup in SETUPS:
                rounds.fail(setup, f"did not start: {error}")
            return _rows(rounds, settings), ""
        warm = chat_body(model.path.name, user_messages("Warm up", 40), 4, model.eos_ids)
        for body in (warm, with_schema(warm)):
            rounds.attempt("warmup", lambda body=body: _ignore(one_chat(url, body)))
        for number in range(settings.rounds):
            print(f"[structured] round {number + 1}/{settings.rounds}", flush=True)
            _round(rounds, model, settings, url, number)
    return _rows(rounds, settings), _details(rounds, model, settings)


def _round(rounds: Interleaved, model: ModelUnderTest, settings: Settings, url: str, number: int) -> None:
    name, eos = model.path.name, model.eos_ids

    def single(constrained: bool) -> dict[str, float]:
        messages = user_messages(f"Story {number:03d} {constrained}", settings.user_chars)
        body = chat_body(name, messages, settings.decode_tokens, eos)
        timing = one_chat(url, with_schema(body) if constrained else body)
        return {"decode_tps": timing.decode_tps, "tokens": float(timing.completion_tokens)}

    def concurrent(constrained: bool) -> dict[str, float]:
        chars, tokens = settings.concurrent_user_chars, settings.concurrent_tokens
        prompts = [
            user_messages(f"{number:03d}-{index:02d}-{constrained}", chars)
            for index in range(settings.streams)
        ]
        bodies = [chat_body(name, messages, tokens, eos) for messages in prompts]
        if constrained:
            bodies = [with_schema(body) for body in bodies]
        return {"aggregate_tps": many_chats(url, bodies).aggregate_tps}

    groups: list[list[tuple[str, Callable[[], dict[str, float]]]]] = [
        [("free1", lambda: single(False)), ("schema1", lambda: single(True))],
        [("freeN", lambda: concurrent(False)), ("schemaN", lambda: concurrent(True))],
    ]
    for group in groups:
        shift = number % len(group)
        for setup, measure in group[shift:] + group[:shift]:
            rounds.attempt(setup, measure)


def _ignore(_: object) -> dict[str, float]:
    return {}


def _rows(rounds: Interleaved, settings: Settings) -> list[Row]:
    n = settings.streams
    return [
        rounds.row("single-stream decode with a json_schema", "schema1.decode_tps",
                   "same instance, no schema", "free1.decode_tps", "tok/s", target=at_least(0.9)),
        rounds.row(f"aggregate, {n} streams each with a json_schema", "schemaN.aggregate_tps",
                   f"same instance, {n} streams, no schema", "freeN.aggregate_tps", "tok/s",
                   target=at_least(0.9)),
    ]  # fmt: skip


def _details(rounds: Interleaved, model: ModelUnderTest, settings: Settings) -> str:
    lines = [
        f"Model: {model.summary}. Each round: one stream of {settings.decode_tokens} tokens with and "
        f"without `response_format` json_schema (strict; one string of at least 2000 characters, so the "
        f"grammar masks every token to `max_tokens`), then {settings.streams} concurrent streams of "
        f"{settings.concurrent_tokens} tokens with a schema each and without. Greedy, EOS banned.",
        "",
        "| setup.metric | rounds | min | median | max |",
        "|---|---|---|---|---|",
    ]
    for key, values in sorted(rounds.samples.items()):
        if values:
            figures = (min(values), statistics.median(values), max(values))
            lines.append(
                f"| {key} | {len(values)} | " + " | ".join(f"{value:.4g}" for value in figures) + " |"
            )
    return "\n".join(lines)
