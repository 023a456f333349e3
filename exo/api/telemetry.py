"""Prometheus metrics (`GET /metrics`) and the run observer that also writes traces.

One `CollectorRegistry` per app, never prometheus-client's global one, so several apps in one
process (tests, benchmarks) do not clash. The API's own figures are counted as they happen; the
node's figures (log index, drops, runners, links, downloads) are read from `node_status()` at scrape
time by a custom collector, so nothing on the node's hot paths knows about Prometheus.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from exo.api.live_feed import LiveFeed
from exo.api.runs import CompletionRun
from exo.api.trace_stages import StageLabel, with_stages
from exo.api.traces import MAX_GAPS, MAX_TRACES, Trace, TraceSpan, TraceStore, gap_summary
from exo.core.state import State
from exo.core.timings import StageTimings

StageTimingsOf = Callable[[str, float], Awaitable[list[StageTimings]]]
STAGE_REPORT_WAIT_S = 1.0  # how long a trace asked for at once waits for its stages' reports

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _RunTimes:
    __slots__ = ("gaps", "last", "tokens")

    def __init__(self) -> None:
        self.last: float | None = None
        self.gaps: list[float] = []
        self.tokens = 0


class _AwaitingStages(NamedTuple):
    """A trace whose stages' reports are still to be merged in (when it is first read)."""

    generation_id: str
    started_ms: float
    labels: list[StageLabel]


class Telemetry:
    """The app's metrics registry, its trace store, and the observer of every completion run.

    With `stage_timings` (the node's token sink keeps what each stage reported of a generation), a
    trace gets its stages' spans when it is first read: the reports come as the request ends on
    each stage, so nothing is merged, or awaited, while tokens stream."""

    def __init__(
        self,
        node_status: Callable[[], Mapping[str, Any]],
        feed: LiveFeed | None = None,
        *,
        stage_timings: StageTimingsOf | None = None,
        state: Callable[[], State] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.traces = TraceStore()
        self._stage_timings = stage_timings
        self._state = state
        self._awaiting: OrderedDict[str, _AwaitingStages] = OrderedDict()
        self._runs: dict[str, _RunTimes] = {}
        registry = self.registry
        self.requests = Counter(
            "exo_http_requests", "HTTP requests by route and status", ["method", "route", "status"],
            registry=registry,
        )  # fmt: skip
        self.tokens = Counter("exo_tokens_generated", "Tokens generated on this node", registry=registry)
        self.ttft = Histogram(
            "exo_time_to_first_token_seconds", "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.inter_token = Histogram(
            "exo_inter_token_latency_seconds", "Gaps between a stream's tokens",
            buckets=GAP_BUCKETS, registry=registry,
        )  # fmt: skip
        self.completions = Counter("exo_completions", "Completions finished on this node", registry=registry)
        self.active = Gauge(
            "exo_active_completions", "Completions in progress on this node", registry=registry
        )
        self.cache_hits = Counter(
            "exo_prefix_cache_hits", "Completions whose prompt reused cached KV", registry=registry
        )
        self.cache_hit_tokens = Counter(
            "exo_prefix_cache_hit_tokens", "Prompt tokens whose prefill the prefix cache skipped",
            registry=registry,
        )  # fmt: skip
        registry.register(NodeCollector(node_status, feed))

    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    # --- RunObserver -----------------------------------------------------------------------

    def run_started(self, run: CompletionRun) -> None:
        self._runs[run.completion_id] = _RunTimes()
        self.active.inc()

    def token_arrived(self, run: CompletionRun, now: float) -> None:
        times = self._runs.get(run.completion_id)
        if times is None:
            return
        self.tokens.inc()
        times.tokens += 1
        if times.last is None:
            self.ttft.observe(now - run.received_at)
        else:
            gap = now - times.last
            self.inter_token.observe(gap)
            if len(times.gaps) < MAX_GAPS:
                times.gaps.append(gap)
        times.last = now

    def run_finished(self, run: CompletionRun) -> None:
        times = self._runs.pop(run.completion_id, None) or _RunTimes()
        self.active.dec()
        self.completions.inc()
        cached = run.cached_tokens
        if cached:
            self.cache_hits.inc()
            self.cache_hit_tokens.inc(cached)
        trace = trace_of(run, times.gaps, times.tokens)
        self.traces.add(trace)
        generation_id = run.generation_ids[0] if run.generation_ids else None
        if self._stage_timings is not None and generation_id is not None:
            started_ms = round((run.started_at - run.received_at) * 1000, 3)
            labels: list[StageLabel] = [
                (node, _layers(shard)) for node, shard in _stages(run.prepared.instance)
            ]
            self._awaiting[trace.request_id] = _AwaitingStages(generation_id, started_ms, labels)
            while len(self._awaiting) > MAX_TRACES:
                self._awaiting.popitem(last=False)

    async def trace(self, request_id: str) -> Trace | None:
        """A request's trace; the first read merges in what its stages reported (waiting up to
        STAGE_REPORT_WAIT_S for reports still on their way)."""
        awaiting = self._awaiting.get(request_id)
        if awaiting is not None and self._stage_timings is not None:
            reports = await self._stage_timings(awaiting.generation_id, STAGE_REPORT_WAIT_S)
            trace = self.traces.get(request_id)
            if self._awaiting.pop(request_id, None) is not None and trace is not None:
                nodes = _nodes_by_address(self._state() if self._state is not None else None)
                self.traces.replace(
                    with_stages(
                        trace, reports, started_ms=awaiting.started_ms, labels=awaiting.labels,
                        nodes_by_address=nodes,
                    )
                )  # fmt: skip
        return self.traces.get(request_id)


def trace_of(run: CompletionRun, gaps: list[float], tokens: int) -> Trace:
    """The run's spans: prepare (template, tokenize, instance), first token (queue, prefill on each
    stage, the hops between them), decode; the instance's stages as they were split."""
    origin = run.received_at
    finished = run.finished_at or time.monotonic()

    def ms(at: float) -> float:
        return round((at - origin) * 1000, 3)

    instance = run.prepared.instance
    spans = [TraceSpan("prepare", 0.0, ms(run.started_at), detail="chat template, tokenize, find instance")]
    first = run.first_token_at
    stages = _stages(instance)
    if first is not None:
        hops = " → ".join(node for node, _ in stages)
        spans.append(
            TraceSpan(
                "queue + prefill", ms(run.started_at), round((first - run.started_at) * 1000, 3),
                detail=f"{run.prompt_tokens} prompt tokens through {hops}",
            )
        )  # fmt: skip
        for node_id, shard in stages:
            spans.append(
                TraceSpan(
                    "stage",
                    ms(run.started_at),
                    ms(first) - ms(run.started_at),
                    node_id,
                    f"{_layers(shard)} (within the prefill: stages do not report their own time yet)",
                )
            )
        spans.append(
            TraceSpan("decode", ms(first), round((finished - first) * 1000, 3), detail=f"{tokens} tokens")
        )
    decode_s = (finished - first) if first is not None else 0.0
    return Trace(
        request_id=run.completion_id,
        model=run.prepared.request.model,
        instance_id=instance.instance_id,
        prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens,
        cached_tokens=run.cached_tokens,
        total_ms=ms(finished),
        ttft_ms=ms(first) if first is not None else None,
        tokens_per_second=round((tokens - 1) / decode_s, 3) if tokens > 1 and decode_s > 0 else None,
        inter_token_ms=gap_summary(gaps),
        spans=spans,
        finished=not run.cancelled,
    )


def _stages(instance: Any) -> list[tuple[str, Any]]:
    """(node, shard) of an instance in pipeline order (ranks in order for a tensor instance)."""
    return sorted(instance.shard_assignments.items(), key=lambda item: _stage_order(item[1]))


def _nodes_by_address(state: State | None) -> dict[str, str]:
    """Which node each runner's activation address belongs to."""
    if state is None:
        return {}
    return {
        runner.activation_address: node_id
        for instance in state.instances.values()
        for node_id, runner in instance.runners.items()
        if runner.activation_address is not None
    }


def _stage_order(shard: Any) -> int:
    return int(getattr(shard, "start_layer", 0) or getattr(shard, "rank", 0) or 0)


def _layers(shard: Any) -> str:
    if getattr(shard, "size", 1) > 1:  # a tensor rank holds a slice of every layer
        return f"rank {shard.rank} of {shard.size}"
    if hasattr(shard, "start_layer"):
        return f"layers {shard.start_layer}-{shard.end_layer}"
    return f"rank {getattr(shard, 'rank', '?')}"


class NodeCollector(Collector):
    """The node's figures from `node_status()`, read at scrape time; missing keys are skipped."""

    def __init__(self, node_status: Callable[[], Mapping[str, Any]], feed: LiveFeed | None) -> None:
        self._node_status = node_status
        self._feed = feed

    def describe(self) -> Iterable[Metric]:
        return []  # figures come and go with the node's state: described when collected

    def collect(self) -> Iterable[Metric]:
        status = self._node_status()
        yield from _gauges(status)
        drops = CounterMetricFamily(
            "exo_bus_frames_dropped", "Bus frames dropped, by reason", labels=["reason"]
        )
        for reason, count in _dict(status.get("dropped_frames")).items():
            drops.add_metric([str(reason)], float(count))
        yield drops
        depths = GaugeMetricFamily("exo_queue_depth", "Queue depths on this node", labels=["queue"])
        for queue, depth in _dict(status.get("queue_depths")).items():
            depths.add_metric([str(queue)], float(depth))
        runners = _dict(status.get("runners"))
        for instance_id, runner in runners.items():
            stats = _dict(_dict(runner).get("stats"))
            if stats:
                depths.add_metric([f"runner_waiting:{instance_id}"], float(stats.get("waiting_requests", 0)))
                depths.add_metric([f"runner_active:{instance_id}"], float(stats.get("active_requests", 0)))
        yield depths
        yield from _runner_metrics(runners)
        yield from _link_metrics(_dict(status.get("links")))
        yield from _download_metrics(status.get("downloads"))
        if self._feed is not None:
            applied = CounterMetricFamily("exo_events_applied", "Events applied on this node")
            applied.add_metric([], float(self._feed.events_applied))
            yield applied
            elections = CounterMetricFamily("exo_elections", "Masters elected (MasterElected applied)")
            elections.add_metric([], float(self._feed.elections))
            yield elections
            pages = GaugeMetricFamily("exo_dashboard_clients", "Dashboards connected to the live feed")
            pages.add_metric([], float(len(self._feed)))
            yield pages


def _gauges(status: Mapping[str, Any]) -> Iterable[Metric]:
    for key, name, doc in (
        ("last_event_index", "exo_log_index", "Index of the last event applied on this node"),
        ("term", "exo_election_term", "The election term this node has seen"),
        ("uptime_s", "exo_uptime_seconds", "Seconds since the node started"),
        ("durable_event_index", "exo_log_durable_index", "Last event index appended durably to this log"),
    ):
        value = status.get(key)
        if isinstance(value, int | float):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], float(value))
            yield gauge
    master = GaugeMetricFamily("exo_is_master", "1 when this node is the master")
    master.add_metric([], 1.0 if status.get("is_master") else 0.0)
    yield master


def _runner_metrics(runners: Mapping[str, Any]) -> Iterable[Metric]:
    batch = GaugeMetricFamily("exo_batch_size_mean", "Rows per batched forward pass", labels=["instance"])
    largest = GaugeMetricFamily("exo_batch_size_max", "Largest batch so far", labels=["instance"])
    sampled = CounterMetricFamily(
        "exo_runner_tokens_sampled", "Tokens sampled by this node's runners", labels=["instance"]
    )
    cached = GaugeMetricFamily(
        "exo_prefix_cache_tokens", "Tokens held in the prefix cache", labels=["instance"]
    )
    for instance_id, runner in runners.items():
        stats = _dict(_dict(runner).get("stats"))
        if not stats:
            continue
        steps, rows = stats.get("batched_steps", 0), stats.get("batched_rows", 0)
        batch.add_metric([instance_id], rows / steps if steps else 1.0)
        largest.add_metric([instance_id], float(stats.get("largest_batch", 0)))
        sampled.add_metric([instance_id], float(stats.get("tokens_sampled", 0)))
        cached.add_metric([instance_id], float(stats.get("prefix_cache_tokens", 0)))
    return [batch, largest, sampled, cached]


def _link_metrics(links: Mapping[str, Any]) -> Iterable[Metric]:
    latency = GaugeMetricFamily("exo_link_latency_seconds", "Bus round trip to a peer", labels=["peer"])
    bandwidth = GaugeMetricFamily(
        "exo_link_bandwidth_bytes_per_second", "Measured bus throughput to a peer", labels=["peer"]
    )
    for peer, link in links.items():
        figures = _dict(link)
        if isinstance(rtt := figures.get("rtt_ms"), int | float):
            latency.add_metric([peer], rtt / 1000)
        if isinstance(rate := figures.get("bandwidth_bytes_per_s"), int | float):
            bandwidth.add_metric([peer], float(rate))
    return [latency, bandwidth]


def _download_metrics(downloads: object) -> Iterable[Metric]:
    """Download figures when the node has them (a Hub fetcher): any mapping or list of entries
    with `bytes_done` (or `downloaded`) and a model id."""
    done = GaugeMetricFamily("exo_download_bytes", "Bytes downloaded so far, by model", labels=["model"])
    total = GaugeMetricFamily("exo_download_bytes_total", "Bytes to download, by model", labels=["model"])
    entries: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(downloads, Mapping):
        entries = [(str(key), _dict(value)) for key, value in downloads.items()]  # pyright: ignore[reportUnknownVariableType]
    elif isinstance(downloads, list):
        for entry in downloads:  # pyright: ignore[reportUnknownVariableType]
            figures = _dict(entry)
            entries.append((str(figures.get("model_id", "?")), figures))
    for model, figures in entries:
        got = figures.get("bytes_done", figures.get("downloaded"))
        if isinstance(got, int | float):
            done.add_metric([model], float(got))
        want = figures.get("bytes_total", figures.get("total"))
        if isinstance(want, int | float):
            total.add_metric([model], float(want))
    return [done, total]


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}  # pyright: ignore[reportUnknownVariableType]


def count_requests(telemetry: Telemetry) -> Any:
    """ASGI middleware counting every HTTP answer by method, route template and status (a route
    template, not the path, so ids in paths do not make a series each)."""
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

    def middleware(app: ASGIApp) -> ASGIApp:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return

            started = False

            def count(status: int) -> None:
                route = str(scope.get("path_template") or "unmatched")
                telemetry.requests.labels(scope.get("method", "?"), route, str(status)).inc()

            async def send_counted(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                    count(message["status"])
                await send(message)

            try:
                await app(scope, receive, send_counted)
            except Exception as error:
                if not started:  # the exception handlers outside this middleware answer it
                    count(_status_of(error))
                raise

        return counted

    return middleware


def _status_of(error: Exception) -> int:
    from exo.api.cluster_port import ServiceError
    from exo.api.errors import service_error_body

    if isinstance(error, ServiceError):
        return service_error_body(error)[0]
    status = getattr(error, "status_code", 500)
    return status if isinstance(status, int) else 500
