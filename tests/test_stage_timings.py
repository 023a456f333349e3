"""Stage timings for traces: what each stage of a pipeline reports when a request ends there, how
the requester's sink keeps them, and how a trace lays them out (exo/inference/timings.py,
exo/api/trace_stages.py). The stages run in process (tests/harness/wired_pipeline.py); the real
cluster's trace is checked in tests/test_pipeline_cluster.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import msgspec
from litestar.testing import TestClient

from exo.api.app import create_app
from exo.api.cluster_port import FinishReason, GeneratedToken
from exo.api.trace_stages import with_stages
from exo.api.traces import Trace, TraceSpan
from exo.core.timings import MAX_TRACED_STEPS, StageTimings
from exo.inference.client import TokenSink
from exo.inference.protocol import GenerationCancelled, StageTimed, encode
from exo.inference.timings import Durations
from tests.harness.api_checks import build_state, say_hello_world
from tests.harness.fakes import FakeNodeServices, GenerateCall
from tests.harness.inference_helpers import tiny_models
from tests.harness.wired_pipeline import WiredPipeline

TWO_STAGES = [(0, 3), (3, 6)]
ONE_STAGE = [(0, 6)]
CHAT = {"model": "exo-tiny", "messages": [{"role": "user", "content": "hi"}]}
PROMPT = [(7 * position) % 500 + 3 for position in range(40)]  # three chunks of 16, 16, 7, then 1


def reports_of(
    splits: Sequence[tuple[int, int]], max_tokens: int, request_id: str = "r"
) -> list[StageTimings]:
    pipeline = WiredPipeline(tiny_models()["llama"], splits, prefix_cache_tokens=0)
    pipeline.start(request_id, PROMPT, max_tokens)
    pipeline.run()
    assert len(pipeline.tokens(request_id)) == max_tokens
    timed = pipeline.messages(request_id, StageTimed)
    return sorted((message.timings for message in timed), key=lambda timings: timings.stage_index)


def test_durations_keep_counts_totals_and_percentiles_in_fixed_buckets() -> None:
    durations = Durations()
    for millis in range(1, 101):
        durations.add(millis / 1000)
    summary = durations.summary()
    assert summary.count == 100 and summary.max_ms == 100.0 and round(summary.total_ms) == 5050
    assert 45 <= summary.p50_ms <= 55 and 90 <= summary.p95_ms <= 100  # log buckets: within ~10 %
    durations.add(-1.0)  # a clock that went backwards counts as nothing, not as negative time
    durations.add(1e9)  # past the last bucket: kept in it
    assert len(durations.buckets) == 96 and durations.count == 102
    assert Durations().summary().p50_ms == 0.0


def test_each_stage_of_two_reports_its_passes_and_the_first_stage_its_round_trips() -> None:
    first, last = reports_of(TWO_STAGES, max_tokens=24)
    assert (first.stage_index, last.stage_index) == (0, 1) and first.stages == last.stages == 2
    assert first.stage_address == "tcp://stage0" and last.stage_address == "tcp://stage1"
    for report in (first, last):
        assert report.prefill_chunks == 3 and report.prefill_ms > 0  # the chunks before the last
        assert report.passes.count == 24  # every token's pass, not only the traced ones
        assert [record.step for record in report.steps] == list(range(MAX_TRACED_STEPS))
        starts = [record.start_ms for record in report.steps]
        assert starts == sorted(starts) and len(set(starts)) == len(starts)
        assert all(record.pass_ms > 0 for record in report.steps)
        assert report.prefill_start_ms <= report.steps[0].start_ms <= report.first_out_ms
    # The first stage waits for each token: its round trip holds the last stage's time and the hops.
    assert first.rtt.count == 24 and first.sampling.count == 0
    held = {record.step: record.held_ms for record in last.steps}
    assert all(record.rtt_ms >= held[record.step] for record in first.steps)
    # The last stage samples every token and waits for no round trip.
    assert last.sampling.count == 24 and last.rtt.count == 0
    assert all(record.sample_ms > 0 and record.rtt_ms == 0 for record in last.steps)
    assert all(record.held_ms >= record.pass_ms + record.sample_ms for record in last.steps)


def test_a_report_stays_the_same_size_however_long_the_generation() -> None:
    short = reports_of(TWO_STAGES, max_tokens=20)
    long = reports_of(TWO_STAGES, max_tokens=120)
    for brief, lengthy in zip(short, long, strict=True):
        assert lengthy.passes.count == 120 and len(lengthy.steps) == MAX_TRACED_STEPS
        grown = len(encode(StageTimed("r", lengthy))) - len(encode(StageTimed("r", brief)))
        assert grown <= 16  # a few integer counts take a byte more


def test_one_stage_reports_its_passes_and_sampling_and_a_cancelled_request_reports_too() -> None:
    (alone,) = reports_of(ONE_STAGE, max_tokens=12)
    assert alone.stages == 1 and alone.passes.count == alone.sampling.count == 12
    assert alone.rtt.count == 0 and len(alone.steps) == 12
    # With the next step queued ahead of each token, a step does not count the pass before it as waiting.
    assert all(record.wait_ms <= record.pass_ms + record.sample_ms + 5 for record in alone.steps[1:])

    pipeline = WiredPipeline(tiny_models()["llama"], TWO_STAGES, prefix_cache_tokens=0)
    pipeline.start("c", PROMPT, 50)
    while len(pipeline.tokens("c")) < 3:
        pipeline.step()
    pipeline.send(pipeline.route[0], GenerationCancelled(request_id="c"))
    pipeline.run()
    cancelled = [message.timings for message in pipeline.messages("c", StageTimed)]
    assert sorted(timings.stage_index for timings in cancelled) == [0, 1]
    assert all(3 <= timings.passes.count < 50 for timings in cancelled)


async def test_the_sink_keeps_reports_of_its_requests_in_stage_order() -> None:
    sink = TokenSink()
    sink.open_channel("mine")
    last = StageTimings(stage_index=1, stages=2, stage_address="tcp://b")
    first = StageTimings(stage_index=0, stages=2, stage_address="tcp://a")
    sink.deliver([encode(StageTimed("mine", last))], 0.0)
    sink.deliver([encode(StageTimed("someone-else", first))], 0.0)
    assert sink.stale_frames == 1
    assert [timings.stage_address for timings in await sink.stage_timings("mine")] == ["tcp://b"]

    async def first_arrives() -> None:
        await asyncio.sleep(0)
        sink.deliver([encode(StageTimed("mine", first))], 0.0)

    arrival = asyncio.create_task(first_arrives())
    complete = await sink.stage_timings("mine", wait=30.0)  # returns as soon as every stage reported
    await arrival
    assert [timings.stage_index for timings in complete] == [0, 1]
    assert await sink.stage_timings("unknown", wait=30.0) == []
    # A report claiming more stages than a route can have does not decode.
    bad = encode(StageTimed("mine", first)).replace(b"\xa6stages\x02", b"\xa6stages\xcd\x04\x00")
    dropped = sink.dropped_frames
    sink.deliver([bad], 0.0)
    assert sink.dropped_frames == dropped + 1


def base_trace(ttft_ms: float) -> Trace:
    spans = [
        TraceSpan("prepare", 0.0, 5.0),
        TraceSpan("queue + prefill", 5.0, ttft_ms - 5.0),
        TraceSpan("stage", 5.0, ttft_ms - 5.0, "node0"),
        TraceSpan("decode", ttft_ms, 100.0),
    ]
    return Trace(
        request_id="chatcmpl-1", model="m", instance_id="i", prompt_tokens=40, completion_tokens=24,
        cached_tokens=None, total_ms=ttft_ms + 100.0, ttft_ms=ttft_ms, tokens_per_second=None,
        inter_token_ms={}, spans=spans,
    )  # fmt: skip


def passes(trace: Trace, stage: int) -> dict[int, TraceSpan]:
    return {
        span.step: span
        for span in trace.spans
        if span.name == "pass" and span.stage == stage and span.step is not None
    }


# Spans are laid out from rounded figures (3 decimals of a ms): a few of those roundings can add up.
LAYOUT_ROUNDING_MS = 0.005


def test_a_two_stage_trace_lays_out_both_stages_passes_hops_and_sampling_in_order() -> None:
    reports = reports_of(TWO_STAGES, max_tokens=120)
    first = reports[0]
    ttft = 5.0 + first.first_out_ms + first.steps[0].rtt_ms + 2.0  # 1 ms each way to the requester
    nodes = {"tcp://stage0": "node0", "tcp://stage1": "node1"}
    trace = with_stages(
        base_trace(ttft), reports, started_ms=5.0, labels=[("node0", "layers 0-3"), ("node1", "layers 3-6")],
        nodes_by_address=nodes,
    )  # fmt: skip
    assert trace.requester_hop_ms == 1.0
    names = {span.name for span in trace.spans}
    assert {"prefill", "pass", "sampling", "hop"} <= names and "stage" not in names
    assert trace.spans[0].name == "prepare" and trace.spans[-1].name == "decode"
    stage0, stage1 = passes(trace, 0), passes(trace, 1)
    assert sorted(stage0) == sorted(stage1) == list(range(MAX_TRACED_STEPS))
    assert all(span.node_id == "node0" for span in stage0.values())
    assert all(span.node_id == "node1" for span in stage1.values())
    for step in range(MAX_TRACED_STEPS - 1):
        # each token goes through stage 0, then stage 1, before stage 0 runs the next
        # (up to the layout's rounding: each start, duration and hop is rounded to the microsecond)
        assert stage0[step].start_ms + stage0[step].duration_ms <= stage1[step].start_ms + LAYOUT_ROUNDING_MS
        assert stage1[step].start_ms <= stage0[step + 1].start_ms + LAYOUT_ROUNDING_MS
    sampling = [span for span in trace.spans if span.name == "sampling"]
    assert len(sampling) == MAX_TRACED_STEPS and all(span.stage == 1 for span in sampling)
    hops = [span for span in trace.spans if span.name == "hop"]
    assert {span.detail for span in hops} >= {
        "node0 → node1",
        "node1 → node0",
        "requester → node0",
        "node1 → requester",
    }
    assert all(span.duration_ms >= 0 and span.start_ms >= 0 for span in trace.spans)
    # 120 tokens, yet a bounded trace: 2 requester hops, per stage its prefill and 16 steps' spans
    assert len(trace.spans) <= 3 + 2 + 2 * (1 + 3 * MAX_TRACED_STEPS)
    summary0, summary1 = trace.stages
    assert (summary0.node_id, summary1.node_id) == ("node0", "node1")
    assert (
        summary0.steps == summary1.steps == 120
        and summary1.sampling_ms["p95"] > 0
        and not summary0.sampling_ms
    )
    assert summary0.hop_ms is not None and summary0.hop_ms >= 0 and summary0.hop_ms == summary1.hop_ms
    assert len(msgspec.json.encode(trace)) < 20_000


def test_a_one_stage_trace_has_its_pass_and_sampling_and_only_the_requesters_hops() -> None:
    reports = reports_of(ONE_STAGE, max_tokens=8)
    ttft = 5.0 + reports[0].first_out_ms + 4.0
    trace = with_stages(
        base_trace(ttft), reports, started_ms=5.0, labels=[("node0", "layers 0-6")], nodes_by_address={}
    )
    assert [span.step for span in trace.spans if span.name == "pass"] == list(range(8))
    assert len([span for span in trace.spans if span.name == "sampling"]) == 8
    hops = [span for span in trace.spans if span.name == "hop"]
    assert [span.detail for span in hops] == ["requester → node0", "node0 → requester"]
    assert trace.requester_hop_ms == 2.0 and trace.stages[0].hop_ms is None


class TimedFake(FakeNodeServices):
    """A node whose generations' stages reported `reports` (the API's side of the node's port)."""

    def __init__(self, reports: list[StageTimings], **fields: Any) -> None:
        super().__init__(**fields)
        self.reports = reports
        self.asked: list[tuple[str, float]] = []

    async def stage_timings(self, generation_id: str, wait: float) -> list[StageTimings]:
        self.asked.append((generation_id, wait))
        return self.reports

    def _token(self, call: GenerateCall, token: int, finish_reason: FinishReason | None) -> GeneratedToken:
        generated = super()._token(call, token, finish_reason)
        return (
            msgspec.structs.replace(generated, generation_id="gen-1") if call.tokens_sent == 1 else generated
        )


def test_get_trace_merges_the_stages_reports_once() -> None:
    state, _ = build_state()
    fake = TimedFake(reports_of(ONE_STAGE, max_tokens=4), state=state)
    with TestClient(create_app(say_hello_world(fake))) as client:
        completion_id = client.post("/v1/chat/completions", json=CHAT).json()["id"]
        trace = client.get(f"/v1/traces/{completion_id}").json()
        again = client.get(f"/v1/traces/{completion_id}").json()
    assert fake.asked == [("gen-1", 1.0)]  # merged on the first read, kept
    assert trace == again
    assert [stage["node_id"] for stage in trace["stages"]] == ["node0"]
    assert trace["stages"][0]["pass_ms"]["mean"] > 0
    assert [span["step"] for span in trace["spans"] if span["name"] == "pass"] == [0, 1, 2, 3]
