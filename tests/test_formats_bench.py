"""The formats bench's rows from recorded samples (no benchmark is run)."""

from __future__ import annotations

from pathlib import Path

from bench.formats_bench import Checkpoint, _rows
from bench.rounds import Interleaved
from bench.workload import QUICK_SETTINGS

MIB = 2**20


def test_rows_compare_formats_with_float32_and_peaks_with_representation_and_float32_stage() -> None:
    rounds = Interleaved("formats")
    series = {
        "exo_f32.decode_tps": [30.0, 32.0], "exo_bf16.decode_tps": [31.0, 30.0],
        "exo_q4.decode_tps": [29.0, 33.0],
        "exo_f32N.aggregate_tps": [50.0, 40.0], "exo_q4N.aggregate_tps": [52.0, 41.0],
        "mlx_q4.decode_tps": [2.0, 1.5],
        "exo_q4.read_gb_per_s": [1.5, 1.7], "bandwidth.gb_per_s": [3.0, 4.0],
    }  # fmt: skip
    rounds.samples.update(series)
    checkpoints = {
        name: Checkpoint(name, Path(f"/m/{name}"), size * MIB, 368 * MIB)
        for name, size in (("f32", 368), ("bf16", 184), ("q4", 52))
    }
    peaks = {"f32": 600 * MIB, "bf16": 590 * MIB, "q4": 700 * MIB, "runtime": 86 * MIB}
    rows = _rows(rounds, QUICK_SETTINGS, checkpoints, peaks)
    verdicts = {row.what: row.verdict for row in rows}
    assert verdicts["bfloat16 checkpoint, single-stream decode through HTTP"] == "met"  # 31/32
    assert verdicts["4-bit checkpoint (bfloat16 scales), single-stream decode"] == "met"  # 33 / 32
    assert verdicts["4-bit checkpoint, single-stream decode (the moonshot)"] == "missed"  # 33 / 32 < 2
    assert verdicts["4-bit checkpoint, bytes of its stage read per second of decode"] == "missed"  # 1.7/4
    assert verdicts["4-bit checkpoint, single-stream decode against mlx_lm.server"] == "met"  # 33 / 2
    assert verdicts["4-bit checkpoint, aggregate of 8 streams"] == "met"  # 52 / 50
    assert verdicts["peak RSS of the bf16 checkpoint's stage"] == "met"  # 590 / 600
    assert verdicts["peak RSS of the q4 checkpoint's stage"] == "missed"  # 700 / 600 > 1.05
    assert verdicts["peak RSS of the f32 checkpoint's stage (its representation on the CPU)"] == "missed"
    assert len(rows) == 11


def test_missing_runners_make_not_measured_peak_rows() -> None:
    rounds = Interleaved("formats")
    checkpoints = {name: Checkpoint(name, Path(name), MIB, MIB) for name in ("f32", "bf16", "q4")}
    rows = _rows(rounds, QUICK_SETTINGS, checkpoints, {})
    assert all(row.verdict == "not measured" for row in rows)
