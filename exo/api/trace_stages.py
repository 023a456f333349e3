"""A trace's per-stage part, from what each stage of the pipeline reported (exo.core.timings).

Every stage measured durations on its own clock, from its receipt of the request, so no two
machines' clocks are ever compared. Stages are placed on the requester's timeline (ms from the
request's arrival) from the time the generation was sent plus the estimated hops; network hops are
what the first stage's round trip leaves once every other stage's own time is taken out:

    hop = (first stage's round trip for step s - sum over the other stages of the time they held
           step s) / number of hops in the round trip

and the requester's hops are what the time to the first token leaves once the first stage's time
and its round trip for step 0 are taken out, halved (there and back).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from exo.api.traces import StageTrace, Trace, TraceSpan
from exo.core.timings import DurationSummary, StageTimings, StepTiming

StageLabel = tuple[str | None, str]  # the stage's node, and its layers (or rank)


def with_stages(
    trace: Trace,
    reports: Sequence[StageTimings],
    *,
    started_ms: float,
    labels: Sequence[StageLabel],
    nodes_by_address: Mapping[str, str],
) -> Trace:
    """`trace` with the stages' spans and summaries in place of the per-stage guesses."""
    if not reports:
        return trace
    stages = reports[0].stages
    by_index = {report.stage_index: report for report in reports}
    first = by_index.get(0)
    steps = [{record.step: record for record in report.steps} for report in _ordered(by_index, stages)]

    def label(index: int) -> StageLabel:
        report = by_index.get(index)
        node = nodes_by_address.get(report.stage_address) if report is not None else None
        fallback = labels[index] if index < len(labels) else (None, f"stage {index}")
        return (node or fallback[0], fallback[1])

    ring_hop = _mean_ring_hop(by_index, stages)
    requester_hop = None
    if first is not None and trace.ttft_ms is not None:
        step0 = steps[0].get(0)
        round_trip = step0.rtt_ms if step0 is not None and stages > 1 else 0.0
        unaccounted = trace.ttft_ms - started_ms - first.first_out_ms - round_trip
        requester_hop = round(max(0.0, unaccounted) / 2, 3)

    origin0 = started_ms + (requester_hop or 0.0)
    spans: list[TraceSpan] = []
    if requester_hop is not None and trace.ttft_ms is not None:
        spans.append(TraceSpan("hop", started_ms, requester_hop, None, f"requester → {label(0)[0]}", 0))
        last = label(stages - 1)[0]
        spans.append(
            TraceSpan(
                "hop",
                trace.ttft_ms - requester_hop,
                requester_hop,
                last,
                f"{last} → requester",
                stages - 1,
                0,
            )
        )
    summaries: list[StageTrace] = []
    for index in range(stages):
        node, detail = label(index)
        report = by_index.get(index)
        following = label((index + 1) % stages)[0]
        if report is None:
            summaries.append(_missing(index, node, detail))
            continue
        admission = first.admission_ms if first is not None and index else 0.0
        origin = origin0 + admission + index * (ring_hop or 0.0)
        spans.extend(
            _stage_spans(
                report, origin, node=node, following=following, stages=stages, steps=steps, by_index=by_index
            )
        )
        summaries.append(_summary(report, node, detail, ring_hop if stages > 1 else None))
    spans.sort(key=lambda span: span.start_ms)
    kept = [span for span in trace.spans if span.name != "stage"]
    decode = [span for span in kept if span.name == "decode"]
    head = [span for span in kept if span.name != "decode"]
    return msgspec.structs.replace(
        trace, spans=head + spans + decode, stages=summaries, requester_hop_ms=requester_hop
    )


def _ordered(by_index: Mapping[int, StageTimings], stages: int) -> list[StageTimings]:
    empty = StageTimings(stage_index=0, stages=stages)
    return [by_index.get(index, empty) for index in range(stages)]


def _mean_ring_hop(by_index: Mapping[int, StageTimings], stages: int) -> float | None:
    """Mean per hop over every step: the first stage's round trips less the others' held time."""
    first = by_index.get(0)
    if stages < 2 or first is None or not first.rtt.count or len(by_index) < stages:
        return None
    held = sum(report.held_total_ms for index, report in by_index.items() if index)
    return round(max(0.0, first.rtt.total_ms - held) / (first.rtt.count * stages), 3)


def _step_hop(
    step: int, stages: int, steps: Sequence[Mapping[int, StepTiming]], fallback: float | None
) -> float:
    """Step `step`'s hop (its round trip on the first stage less the others' held time), or the
    mean when a stage did not keep that step."""
    first = steps[0].get(step)
    records = [steps[index].get(step) for index in range(1, stages)]
    if first is None or not first.rtt_ms or any(record is None for record in records):
        return fallback or 0.0
    held = sum(record.held_ms for record in records if record is not None)
    return round(max(0.0, first.rtt_ms - held) / stages, 3)


def _stage_spans(
    report: StageTimings,
    origin: float,
    *,
    node: str | None,
    following: str | None,
    stages: int,
    steps: Sequence[Mapping[int, StepTiming]],
    by_index: Mapping[int, StageTimings],
) -> list[TraceSpan]:
    index = report.stage_index
    spans: list[TraceSpan] = []
    if report.admission_ms:
        spans.append(TraceSpan("queue", origin, report.admission_ms, node, "waiting to be admitted", index))
    if report.prefill_chunks:
        spans.append(
            TraceSpan(
                "prefill", origin + report.prefill_start_ms, report.prefill_wait_ms + report.prefill_ms, node,
                f"{report.prefill_chunks} prompt chunks before the last, {report.prefill_ms:g} ms computing",
                index,
            )
        )  # fmt: skip
    ring_hop = _mean_ring_hop(by_index, stages)
    for record in report.steps:
        start = origin + record.start_ms
        waited = f", after waiting {record.wait_ms:g} ms" if record.wait_ms >= 0.01 else ""
        spans.append(
            TraceSpan("pass", start, record.pass_ms, node, f"step {record.step}{waited}", index, record.step)
        )
        ready = start + record.pass_ms
        if record.sample_ms:
            spans.append(
                TraceSpan(
                    "sampling", ready, record.sample_ms, node, f"step {record.step}", index, record.step
                )
            )
            ready += record.sample_ms
        if stages > 1:
            hop = _step_hop(record.step, stages, steps, ring_hop)
            spans.append(TraceSpan("hop", ready, hop, node, f"{node} → {following}", index, record.step))
    return [_rounded(span) for span in spans]


def _rounded(span: TraceSpan) -> TraceSpan:
    return msgspec.structs.replace(span, start_ms=round(max(0.0, span.start_ms), 3))


def _summary(report: StageTimings, node: str | None, detail: str, hop: float | None) -> StageTrace:
    return StageTrace(
        stage_index=report.stage_index,
        node_id=node,
        detail=detail,
        steps=report.passes.count,
        admission_ms=report.admission_ms,
        prefill_ms=report.prefill_ms,
        prefill_chunks=report.prefill_chunks,
        wait_ms=_figures(report.wait),
        pass_ms=_figures(report.passes),
        sampling_ms=_figures(report.sampling),
        hop_ms=hop,
    )


def _missing(index: int, node: str | None, detail: str) -> StageTrace:
    return StageTrace(
        stage_index=index, node_id=node, detail=f"{detail} (no report: the stage ended without one)",
        steps=0, admission_ms=0.0, prefill_ms=0.0, prefill_chunks=0, wait_ms={}, pass_ms={}, sampling_ms={},
    )  # fmt: skip


def _figures(summary: DurationSummary) -> dict[str, float]:
    if not summary.count:
        return {}
    return {
        "total": summary.total_ms,
        "mean": round(summary.mean_ms, 3),
        "p50": summary.p50_ms,
        "p95": summary.p95_ms,
        "max": summary.max_ms,
    }
