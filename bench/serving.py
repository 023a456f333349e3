"""Serving through HTTP: exo against mlx-lm in-process and `mlx_lm.server`, all in one run.

One two-node exo cluster holds two instances of the same weights: model X on one node (one stage)
and its hard-linked copy X2 as a two-stage pipeline over both nodes. Beside it run `mlx_lm.server`
(MKL loaded first, as exo's runners do) and mlx-lm's `stream_generate` in its own process. Every
round measures each setup once, in turn:

- one stream: decode tok/s and time to first token (exo X, mlx_lm.server, in-process);
- N concurrent streams: aggregate tok/s (exo X with 1 and N streams, X2 with N, mlx_lm.server
  with 1 and N);
- a chat's second turn after its first (prefix cache) against the same-length turn whose prefix
  nothing has seen (exo and mlx_lm.server);
- the machine's memory bandwidth, against the bytes of weights a decode step reads.
Prompts are unique per round and setup, so no prompt cache helps where it should not.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.http_stream import StreamTiming, chat_body, many_chats, one_chat
from bench.machine import memory_bandwidth
from bench.processes import ExoCluster, InProcessBaseline, ProcessFailed, mlx_server
from bench.rounds import Interleaved
from bench.suite import Row, at_least, at_most
from bench.workload import ModelUnderTest, Settings, first_turn, second_turn, user_messages

MLX_MODEL = "default_model"  # what mlx_lm.server calls the model given by --model
EXO_SINGLE = ("exo", "exo1", "exoN", "exoprefix")  # setups served by X
EXO_PIPELINE = ("exo2stageN",)  # served by X2


def run_serving(model: ModelUnderTest, settings: Settings, root: Path) -> tuple[list[Row], str]:
    rounds = Interleaved("serving")
    with contextlib.ExitStack() as stack:
        cluster = ExoCluster(root / "cluster", model.path.parent, 2)
        stack.callback(cluster.stop)
        server = mlx_server(model.path, root)
        stack.callback(server.stop)
        # Everything starts at once (model loads overlap), then each is waited for.
        for node in cluster.nodes.values():
            node.start()
        server.start()
        inprocess = InProcessBaseline(model.path, root / "inprocess.log")
        stack.callback(inprocess.close)
        run = ServingRound(rounds, model, settings, _start_exo(cluster, model, rounds), server.url, inprocess)
        _start(rounds, ("inprocess",), inprocess.wait_ready)
        _start(rounds, ("mlx", "mlx1", "mlxN", "mlxprefix"), lambda: server.wait_serving("/health"))
        run.warm_up()
        for number in range(settings.rounds):
            run.measure(number)
    return _rows(rounds, model, settings), _details(rounds, model, settings)


def _start(rounds: Interleaved, setups: tuple[str, ...], start: Callable[[], object]) -> None:
    try:
        start()
    except ProcessFailed as error:
        for setup in setups:
            rounds.fail(setup, f"did not start: {error}")


def _start_exo(cluster: ExoCluster, model: ModelUnderTest, rounds: Interleaved) -> dict[str, str]:
    """Setup name -> the API URL its requests go to, for the setups whose instance is ready."""
    urls: dict[str, str] = {}
    try:
        cluster.wait_ready()
    except ProcessFailed as error:
        for setup in EXO_SINGLE + EXO_PIPELINE:
            rounds.fail(setup, f"cluster did not start: {error}")
        return urls
    for setups, instance_model, stages in ((EXO_SINGLE, model.path, 1), (EXO_PIPELINE, model.copy, 2)):
        try:
            instance = cluster.place(instance_model.name, stages)
        except ProcessFailed as error:
            for setup in setups:
                rounds.fail(setup, f"placing {stages} stage(s) failed: {error}")
            continue
        for setup in setups:
            urls[setup] = cluster.entry_url(instance)
    return urls


@dataclass
class ServingRound:
    """One round measures every setup once, in a fixed order."""

    rounds: Interleaved
    model: ModelUnderTest
    settings: Settings
    urls: dict[str, str]
    mlx_url: str
    inprocess: InProcessBaseline

    def warm_up(self) -> None:
        """One short request each: first-request costs (graph building, allocation) are not measured."""
        messages = user_messages("Warm up", 40)
        self.rounds.attempt(
            "inprocess", lambda: _ignore(self.inprocess.run({"messages": messages, "max_tokens": 4}))
        )
        for setup, name in (
            ("exo", self.model.path.name),
            ("exo2stageN", self.model.copy.name),
            ("mlx", MLX_MODEL),
        ):
            url = self.mlx_url if setup == "mlx" else self.urls.get(setup)
            if url is not None:
                body = chat_body(name, messages, 4, self.model.eos_ids)
                self.rounds.attempt(setup, lambda url=url, body=body: _ignore(one_chat(url, body)))

    def measure(self, number: int) -> None:
        model, settings = self.model, self.settings
        exo, pipeline, mlx = self.urls.get("exo", ""), self.urls.get("exo2stageN", ""), self.mlx_url
        streams, x, x2 = settings.streams, model.path.name, model.copy.name
        print(f"[serving] round {number + 1}/{settings.rounds}", flush=True)
        groups: list[list[tuple[str, Callable[[], dict[str, float]]]]] = [
            [
                ("inprocess", lambda: self.inprocess_single(number)),
                ("exo", lambda: self.single(exo, x, number)),
                ("mlx", lambda: self.single(mlx, MLX_MODEL, number)),
            ],
            [
                ("exo1", lambda: self.concurrent(exo, x, f"exo1 {number:03d}", 1)),
                ("exoN", lambda: self.concurrent(exo, x, f"exoN {number:03d}", streams)),
                ("exo2stageN", lambda: self.concurrent(pipeline, x2, f"exo2 {number:03d}", streams)),
                ("mlx1", lambda: self.concurrent(mlx, MLX_MODEL, f"mlx1 {number:03d}", 1)),
                ("mlxN", lambda: self.concurrent(mlx, MLX_MODEL, f"mlxN {number:03d}", streams)),
            ],
            [
                ("exoprefix", lambda: self.prefix(exo, x, 2 * number, cold_first=number % 2 == 1)),
                (
                    "mlxprefix",
                    lambda: self.prefix(mlx, MLX_MODEL, 2 * number + 500, cold_first=number % 2 == 0),
                ),
                ("bandwidth", lambda: {"gb_per_s": memory_bandwidth(repeats=3) / 1e9}),
            ],
        ]
        for group in groups:
            # Each round starts a group at a different setup, so a slow stretch of the shared
            # machine does not always fall on the same one.
            shift = number % len(group)
            for setup, measure in group[shift:] + group[:shift]:
                self.rounds.attempt(setup, measure)

    def single(self, url: str, name: str, number: int) -> dict[str, float]:
        messages = user_messages(f"Question {number:03d}", self.settings.user_chars)
        timing = one_chat(url, chat_body(name, messages, self.settings.decode_tokens, self.model.eos_ids))
        return {"decode_tps": timing.decode_tps, "ttft": timing.ttft}

    def inprocess_single(self, number: int) -> dict[str, float]:
        messages = user_messages(f"Question {number:03d}", self.settings.user_chars)
        bias = {str(token): -100 for token in self.model.eos_ids}
        request = {"messages": messages, "max_tokens": self.settings.decode_tokens, "logit_bias": bias}
        answer = self.inprocess.run(request)
        return {"decode_tps": float(answer["decode_tps"]), "ttft": float(answer["ttft"])}

    def concurrent(self, url: str, name: str, tag: str, count: int) -> dict[str, float]:
        settings = self.settings
        bodies = [
            chat_body(name, user_messages(f"{tag}-{index:02d}", settings.concurrent_user_chars),
                      settings.concurrent_tokens, self.model.eos_ids)
            for index in range(count)
        ]  # fmt: skip
        return {"aggregate_tps": many_chats(url, bodies).aggregate_tps}

    def prefix(self, url: str, name: str, nonce: int, *, cold_first: bool) -> dict[str, float]:
        """Turn 2 of a chat right after its turn 1 (warm) against turn 2 of a chat of the same
        length whose first turn was never sent (cold): all of its prompt has to be prefilled."""
        chars, eos = self.settings.system_chars, self.model.eos_ids
        warm_nonce, cold_nonce = 100_000 + nonce, 200_000 + nonce
        first = one_chat(
            url, chat_body(name, first_turn(warm_nonce, chars), self.settings.turn_one_tokens, eos)
        )

        def turn_two(which: int) -> StreamTiming:
            messages = second_turn(which, chars, first.text)
            return one_chat(url, chat_body(name, messages, self.settings.turn_two_tokens, eos))

        if cold_first:
            cold = turn_two(cold_nonce)
            warm = turn_two(warm_nonce)
        else:
            warm = turn_two(warm_nonce)
            cold = turn_two(cold_nonce)
        figures = {"warm_ttft": warm.ttft, "cold_ttft": cold.ttft, "prompt_tokens": float(warm.prompt_tokens)}
        if warm.cached_tokens is not None:
            figures["cached_tokens"] = float(warm.cached_tokens)
        return figures


def _ignore(_: object) -> dict[str, float]:
    return {}


def _rows(rounds: Interleaved, model: ModelUnderTest, settings: Settings) -> list[Row]:
    n = settings.streams
    cached = rounds.values("exoprefix.cached_tokens")
    prompt = rounds.values("exoprefix.prompt_tokens")
    cache_note = (
        f"cached_tokens reported: {int(max(cached))} of {int(prompt[0])}"
        if cached
        else "usage reports no cached_tokens" + (f"; {int(prompt[0])}-token prompt" if prompt else "")
    )
    for key in ("exo.decode_tps", "inprocess.decode_tps"):
        source = key.split(".")[0]
        rounds.samples[f"{source}.weight_gb_per_s"] = [
            tps * model.weight_bytes / 1e9 for tps in rounds.values(key)
        ]
    return [
        rounds.row("single-stream decode through HTTP", "exo.decode_tps", "mlx-lm stream_generate in-process",
                   "inprocess.decode_tps", "tok/s", target=at_least(0.95)),
        rounds.row("single-stream decode", "exo.decode_tps", "mlx_lm.server", "mlx.decode_tps", "tok/s",
                   target=at_least(1.0)),
        rounds.row("single-stream time to first token", "exo.ttft", "mlx_lm.server", "mlx.ttft", "s",
                   better="lower", target=at_most(1.1)),
        rounds.row(f"aggregate, {n} concurrent streams", "exoN.aggregate_tps", "same exo, 1 stream",
                   "exo1.aggregate_tps", "tok/s", target=at_least(3.0)),
        rounds.row(f"aggregate, {n} concurrent streams", "exoN.aggregate_tps",
                   "mlx_lm.server with its batching", "mlxN.aggregate_tps", "tok/s", target=at_least(1.0)),
        rounds.row(f"2-stage pipeline aggregate, {n} streams, nodes sharing the machine",
                   "exo2stageN.aggregate_tps", "same model, 1 stage", "exoN.aggregate_tps", "tok/s",
                   target=at_least(0.9)),
        rounds.row("second turn of a chat, time to first token (prefill)", "exoprefix.warm_ttft",
                   "same-length turn, nothing cached", "exoprefix.cold_ttft", "s", better="lower",
                   target=at_most(0.3), note=cache_note),
        rounds.row("weight bytes read per second while decoding (exo, 1 stream)", "exo.weight_gb_per_s",
                   "memory bandwidth (numpy copy, read + write)", "bandwidth.gb_per_s", "GB/s"),
        # Context, no target: what the baselines themselves do.
        rounds.row("mlx_lm.server single-stream decode", "mlx.decode_tps",
                   "mlx-lm stream_generate in-process", "inprocess.decode_tps", "tok/s"),
        rounds.row(f"mlx_lm.server aggregate, {n} streams", "mlxN.aggregate_tps", "mlx_lm.server, 1 stream",
                   "mlx1.aggregate_tps", "tok/s"),
        rounds.row("mlx_lm.server second turn, time to first token", "mlxprefix.warm_ttft",
                   "same-length turn, nothing cached", "mlxprefix.cold_ttft", "s", better="lower"),
        rounds.row("weight bytes read per second while decoding (mlx-lm in-process)",
                   "inprocess.weight_gb_per_s", "memory bandwidth (numpy copy, read + write)",
                   "bandwidth.gb_per_s", "GB/s"),
    ]  # fmt: skip


def _details(rounds: Interleaved, model: ModelUnderTest, settings: Settings) -> str:
    lines = [
        f"Model: {model.summary}. Each round: one stream of {settings.decode_tokens} tokens "
        f"(greedy, EOS banned through `logit_bias` so every stream runs to `max_tokens`), "
        f"{settings.streams} concurrent streams of {settings.concurrent_tokens} tokens, a chat whose "
        f"first turn has a {settings.system_chars}-character system prompt. Decode tok/s is "
        "(tokens - 1) / (first text chunk -> finish chunk), seen by the client; aggregate tok/s is all "
        "streams' tokens over the wall time from the first request to the last finish.",
        "",
        "| setup.metric | rounds | min | median | max |",
        "|---|---|---|---|---|",
    ]
    for key, values in sorted(rounds.samples.items()):
        if values:
            figures = (min(values), statistics.median(values), max(values))
            lines.append(
                f"| {key} | {len(values)} | " + " | ".join(f"{value:.3g}" for value in figures) + " |"
            )
    for setup, reason in sorted(rounds.failures.items()):
        lines.append(f"\n{setup} failed: {reason}")
    return "\n".join(lines)
