"""The benchmark suite's bookkeeping: ratios, targets, verdicts, markdown. Nothing here runs or
times a benchmark."""

from __future__ import annotations

import argparse
import math

import pytest

from bench.__main__ import parse_sections
from bench.existing import BenchOutput, events_rows, replay_rows
from bench.processes import ProcessFailed
from bench.rounds import Interleaved
from bench.suite import (
    GENERATED_END,
    GENERATED_START,
    TIMES,
    Row,
    RunHeader,
    Samples,
    at_least,
    at_most,
    failed_row,
    format_number,
    parse_markdown_tables,
    parse_number,
    replace_generated,
    results_markdown,
    summary_table,
    tally,
)

EVENTS_OUTPUT = """# events bench, vm (x86_64), 2026-11-27 05:00 UTC, python 3.11.7

| measure | value | target | ratio to target |
|---|---|---|---|
| events/s, submitted -> applied on all 3 nodes (100000 events) | 25,000 | 20,000 | 1.25x |
| events/s, submitted -> applied back at the origin | 30,000 | | |
| latency p50 at 1000/s for 5s (5000 events) | 1.50 ms | | |
| latency p99 at 1000/s | 12.50 ms | 10 ms | 0.80x headroom |
"""

REPLAY_OUTPUT = """## Event store: 2026-11-27, vm (x86_64, 2 cores, load average 3.4, 4.4, 4.7), Python 3.11.7

| measurement | events/s (wall) | events per CPU second | ratio to baseline (CPU) |
|---|---:|---:|---:|
| baseline: read + msgspec decode, no apply | 716,167 | 747,710 | 1.00 |
| replay: read + decode + `exo.core.state.apply` (`exo.replay.rebuild`) | 257,854 | 261,698 | 0.35 |
| `exo-replay --json` command, whole process (7.3 s) | 137,582 | 140,153 | 0.19 |

| events per commit | synchronous=FULL events/s | synchronous=NORMAL events/s | FULL / NORMAL |
|---:|---:|---:|---:|
| 1 | 303 | 354 | 0.86 |
| 64 | 12,339 | 17,307 | 0.71 |
| 1024 | 48,433 | 45,186 | 1.07 |
"""


def test_samples_best_follows_the_direction_and_median_is_the_middle() -> None:
    faster = Samples((10.0, 30.0, 20.0), "tok/s")
    assert (faster.best, faster.median) == (30.0, 20.0)
    shorter = Samples((0.5, 0.2, 0.9, 0.4), "s", "lower")
    assert (shorter.best, shorter.median) == (0.2, 0.45)


@pytest.mark.parametrize("values", [(), (math.nan,), (1.0, math.inf)])
def test_samples_refuse_empty_or_non_finite_values(values: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="Samples"):
        Samples(values, "tok/s")


def test_targets_compare_in_their_direction_and_print_as_ratios() -> None:
    assert at_least(0.95).met(0.95) and not at_least(0.95).met(0.949)
    assert at_most(1.1).met(1.1) and not at_most(1.1).met(1.11)
    assert str(at_least(3)) == f"≥ 3{TIMES}"
    assert str(at_most(0.3)) == f"≤ 0.3{TIMES}"


def test_row_ratio_uses_bests_and_medians_and_judges_on_bests() -> None:
    row = Row(
        "serving",
        "decode",
        Samples((9.0, 10.0, 5.0), "tok/s"),
        "in-process",
        Samples((10.0, 8.0, 9.0), "tok/s"),
        at_least(0.95),
    )
    assert row.ratio_best == pytest.approx(1.0)
    assert row.ratio_median == pytest.approx(1.0)
    assert row.verdict == "met"
    slower = Row(
        "serving", "decode", Samples((9.0,), "tok/s"), "b", Samples((10.0,), "tok/s"), at_least(0.95)
    )
    assert slower.verdict == "missed"


def test_lower_is_better_rows_take_the_smallest_value_as_best() -> None:
    row = Row(
        "serving",
        "ttft",
        Samples((0.30, 0.20), "s", "lower"),
        "cold",
        Samples((1.0, 2.0), "s", "lower"),
        at_most(0.3),
    )
    assert row.ratio_best == pytest.approx(0.2)
    assert row.verdict == "met"


def test_a_row_without_target_is_reported_and_a_failed_row_is_not_measured() -> None:
    reported = Row("x", "bandwidth", Samples((1.0,), "GB/s"), "copy", Samples((4.0,), "GB/s"))
    assert reported.verdict == "report"
    assert reported.ratio_best == pytest.approx(0.25)
    failed = failed_row("serving", "decode", "mlx_lm.server", at_least(1.0), reason="server did not start")
    assert failed.verdict == "not measured"
    assert failed.ratio_best is None and failed.ratio_median is None


def test_summary_table_shows_every_row_with_its_mark_and_escapes_pipes() -> None:
    rows = [
        Row("a", "met | row", Samples((2.0,), "x"), "base", Samples((1.0,), "x"), at_least(1.5)),
        Row("a", "missed row", Samples((1.0,), "x"), "base", Samples((1.0,), "x"), at_least(1.5)),
        failed_row("a", "failed row", "base", at_least(1.0), reason="no\nserver | here"),
    ]
    table = summary_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert "met \\| row" in table[2] and table[2].endswith("| ✓ |")
    assert table[3].endswith("| ✗ |")
    assert "✗ not measured: no server \\| here" in table[4]
    assert all(line.count(" | ") == table[0].count(" | ") for line in table[2:4])
    assert tally(rows) == "1 met, 1 missed, 1 not measured, 0 reported without a target"


def test_format_number_keeps_a_few_significant_digits() -> None:
    assert [format_number(value) for value in (12345.6, 123.4, 12.34, 1.234, 0.1234, 0.01234, 0.0)] == [
        "12,346",
        "123",
        "12.3",
        "1.23",
        "0.12",
        "0.0123",
        "0.00",
    ]


def test_results_markdown_has_the_header_the_table_and_every_round() -> None:
    header = RunHeader(
        date="2026-11-27 05:00 UTC",
        commit="abc1234",
        machine="Linux x86_64, AMD EPYC, 2 usable cores",
        load_at_start=(3.0, 2.0, 1.0),
        load_at_end=(4.0, 3.0, 2.0),
        software="Python 3.11",
        model="tiny",
        command="python -m bench",
        duration_s=600.0,
    )
    row = Row(
        "s", "decode", Samples((1.0, 3.0), "tok/s"), "base", Samples((2.0, 2.5), "tok/s"), at_least(1.0)
    )
    text = results_markdown(header, [row], [("Details", "body text")])
    assert "- commit: abc1234" in text
    assert "at start: 3.0, 2.0, 1.0; at end: 4.0, 3.0, 2.0" in text
    assert "(10.0 minutes)" in text
    assert "| s | decode | 1.00, 3.00 tok/s | base: 2.00, 2.50 tok/s |" in text
    assert "### Details\n\nbody text" in text
    nested = results_markdown(header, [row], [("Events", "# events bench\n\n## Event store\n#hashtag")])
    assert "### Events\n\n#### events bench\n\n#### Event store\n#hashtag" in nested


def test_replace_generated_keeps_hand_written_text_around_the_block() -> None:
    document = f"# Title\n\nintro\n\n{GENERATED_START}\nold figures\n{GENERATED_END}\n\n## Notes\nkept\n"
    replaced = replace_generated(document, "new figures\n")
    assert "old figures" not in replaced
    assert replaced.startswith("# Title\n\nintro\n\n")
    assert f"{GENERATED_START}\nnew figures\n{GENERATED_END}\n\n## Notes\nkept\n" in replaced
    assert replace_generated(replaced, "new figures\n") == replaced


def test_replace_generated_appends_a_block_when_there_is_none_and_refuses_half_a_block() -> None:
    appended = replace_generated("# Title\n", "figures")
    assert appended == f"# Title\n\n{GENERATED_START}\nfigures\n{GENERATED_END}\n"
    with pytest.raises(ValueError, match="only one"):
        replace_generated(f"# Title\n{GENERATED_START}\nno end\n", "figures")


def test_markdown_tables_and_numbers_are_read_back() -> None:
    tables = parse_markdown_tables(REPLAY_OUTPUT)
    assert len(tables) == 2
    assert tables[0][1]["events per CPU second"] == "261,698"
    assert tables[1][2]["events per commit"] == "1024"
    assert parse_number("261,698") == 261698
    assert parse_number("1.25x") == 1.25
    assert parse_number("12.50 ms") == 12.5
    with pytest.raises(ValueError, match="no number"):
        parse_number("n/a")


def test_events_bench_output_becomes_rows_against_its_absolute_targets() -> None:
    rate, latency = events_rows(BenchOutput(EVENTS_OUTPUT, None, 1.0))
    assert rate.ratio_best == pytest.approx(1.25) and rate.verdict == "met"
    assert latency.ratio_best == pytest.approx(1.25) and latency.verdict == "missed"


def test_replay_bench_output_becomes_rows() -> None:
    rows = replay_rows(BenchOutput(REPLAY_OUTPUT, None, 1.0))
    assert rows[0].ratio_best == pytest.approx(261698 / 200000) and rows[0].verdict == "met"
    assert rows[1].ratio_best == pytest.approx(257854 / 716167)
    assert rows[3].ratio_best == pytest.approx(12339 / 17307)


def test_a_bench_that_failed_or_printed_nonsense_gives_not_measured_rows() -> None:
    failed = events_rows(BenchOutput("", "bench.events_bench exited with status 1: boom", 1.0))
    assert [row.verdict for row in failed] == ["not measured", "not measured"]
    assert failed[0].failure is not None and "boom" in failed[0].failure
    garbled = replay_rows(BenchOutput("| a | b |\n|---|---|\n| 1 | 2 |\n", None, 1.0))
    assert [row.verdict for row in garbled] == ["not measured"]


def test_interleaved_rows_name_the_failure_or_the_missing_series() -> None:
    rounds = Interleaved("serving")
    rounds.attempt("exo", lambda: {"decode_tps": 10.0})
    rounds.attempt("exo", lambda: {"decode_tps": 12.0})
    rounds.attempt("base", lambda: {"decode_tps": 11.0})
    row = rounds.row("decode", "exo.decode_tps", "base", "base.decode_tps", "tok/s", target=at_least(1.0))
    assert row.measured is not None and row.measured.values == (10.0, 12.0)
    assert row.verdict == "met"
    rounds.fail("mlx", "did not start")
    failed = rounds.row("decode", "exo.decode_tps", "mlx", "mlx.decode_tps", "tok/s", target=at_least(1.0))
    assert failed.verdict == "not measured" and failed.failure == "did not start"
    missing = rounds.row("decode", "exo.ttft", "base", "base.ttft", "s")
    assert missing.failure == "no samples of exo.ttft"


def test_sections_are_checked() -> None:
    assert parse_sections("serving, events") == ["serving", "events"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown section"):
        parse_sections("serving,nonsense")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_sections(" , ")


def test_a_failed_measurement_is_counted_retried_and_named_in_the_row() -> None:
    rounds = Interleaved("pinned")
    outcomes: list[float | None] = [None, 20.0, 22.0]

    def flaky() -> dict[str, float]:
        value = outcomes.pop(0)
        if value is None:
            raise ProcessFailed("stage stopped responding\ndetails")
        return {"aggregate_tps": value}

    for _ in range(3):
        rounds.attempt("one", flaky)
        rounds.attempt("two", lambda: {"aggregate_tps": 30.0})
    row = rounds.row(
        "scaling", "two.aggregate_tps", "one", "one.aggregate_tps", "tok/s", target=at_least(1.7)
    )
    assert row.measured is not None and row.baseline is not None
    assert row.baseline.values == (20.0, 22.0)
    assert row.verdict == "missed"
    assert row.note == "one: 1 failed attempt(s), first: stage stopped responding"


def test_a_setup_that_never_succeeds_or_never_started_is_not_measured() -> None:
    rounds = Interleaved("serving")

    def broken() -> dict[str, float]:
        raise ProcessFailed("mlx_lm.server exited (status 1); log tail:\nTraceback ...")

    rounds.attempt("mlx", broken)
    rounds.attempt("exo", lambda: {"decode_tps": 1.0})
    row = rounds.row("decode", "exo.decode_tps", "mlx", "mlx.decode_tps", "tok/s")
    assert row.verdict == "not measured"
    assert row.failure == "every attempt failed: mlx_lm.server exited (status 1); log tail:"
    rounds.fail("inprocess", "did not start")
    calls: list[int] = []
    rounds.attempt("inprocess", lambda: calls.append(1) or {"decode_tps": 1.0})
    assert calls == []
