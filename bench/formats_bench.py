"""Checkpoint formats through HTTP: bfloat16 and 4-bit (bfloat16 scales) against float32, one run.

One exo node (default `--weights-dtype auto`) holds three instances of the suite's model saved
three ways by `python -m exo.inference.synthetic`: float32, bfloat16 (`--dtype bfloat16`) and
mlx-lm 4-bit converted from bfloat16 (`--dtype bfloat16 --quantize 4`, group 64: bfloat16 scales,
biases and norms, as the MLX community's Hub conversions are), plus the built-in tiny model (its
runner's peak RSS is the runtime's own). On MLX's CPU backend the 4-bit stage computes through
exo's kernel (exo/inference/qkernel.py) where it builds, holding the packed weights.
`mlx_lm.server` serves the same 4-bit checkpoint (MKL loaded first, as exo's runners do). Every
round measures, in turn: one stream on each, and 8
concurrent streams on float32 and 4-bit (`mlx_lm.server`'s stream is MLX_TOKENS long: it is
some 70 times slower). Afterwards each runner's peak RSS (VmHWM) is read and set against the bytes
of the representation its stage holds plus the runtime. The bytes the 4-bit stage reads per second
of decode (tok/s times the bytes it holds) are set against the machine's copy bandwidth, measured
in the rounds.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench.http_stream import chat_body, many_chats, one_chat
from bench.machine import memory_bandwidth
from bench.processes import ExoCluster, ProcessFailed, eos_token_ids, make_model, mlx_server
from bench.rounds import Interleaved
from bench.suite import Row, Samples, at_least, at_most, failed_row
from bench.workload import ModelUnderTest, Settings, user_messages
from exo.inference.models import get_model
from exo.inference.synthetic import BUILTIN_MODEL_ID

SECTION = "formats"
MLX_MODEL = "default_model"
MLX_TOKENS = 16
FORMATS = {"f32": [], "bf16": ["--dtype", "bfloat16"], "q4": ["--dtype", "bfloat16", "--quantize", "4"]}


@dataclass(frozen=True)
class Checkpoint:
    name: str  # f32, bf16, q4
    path: Path
    file_bytes: int
    float32_bytes: int


def make_checkpoints(model: ModelUnderTest, model_arguments: list[str]) -> dict[str, Checkpoint]:
    checkpoints: dict[str, Checkpoint] = {}
    for name, extra in FORMATS.items():
        path = (
            model.path
            if name == "f32"
            else make_model(model.path.parent, f"{model.path.name}-{name}", [*model_arguments, *extra])
        )
        info = get_model(path.parent, path.name)
        wide = info.float32
        float32_bytes = info.total_weight_bytes if wide is None else (
            sum(wide.layer_bytes) + wide.embedding_bytes + wide.head_bytes + wide.other_bytes
        )  # fmt: skip
        checkpoints[name] = Checkpoint(name, path, info.total_weight_bytes, float32_bytes)
    return checkpoints


def run_formats(
    model: ModelUnderTest, settings: Settings, root: Path, model_arguments: list[str]
) -> tuple[list[Row], str]:
    rounds = Interleaved(SECTION)
    checkpoints = make_checkpoints(model, model_arguments)
    peaks: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        cluster = ExoCluster(root / "formats", model.path.parent, 1)
        stack.callback(cluster.stop)
        server = mlx_server(checkpoints["q4"].path, root / "formats")
        stack.callback(server.stop)
        cluster.nodes["node0"].start()
        server.start()
        urls, instances = _place_all(cluster, checkpoints, rounds)
        try:
            server.wait_serving("/health")
            urls["mlx_q4"] = server.url
        except ProcessFailed as error:
            rounds.fail("mlx_q4", f"did not start: {error}")
        run = FormatsRound(rounds, settings, checkpoints, urls, eos_token_ids(model.path))
        run.warm_up()
        for number in range(settings.rounds):
            run.measure(number)
        node = cluster.nodes["node0"]
        if node.process is not None:
            peaks = runner_peaks(node.process.pid, instances)
    return _rows(rounds, settings, checkpoints, peaks), _details(rounds, checkpoints, peaks)


def _place_all(
    cluster: ExoCluster, checkpoints: dict[str, Checkpoint], rounds: Interleaved
) -> tuple[dict[str, str], dict[str, str]]:
    """Setup -> API URL, and format -> instance id, for what became ready."""
    urls: dict[str, str] = {}
    instances: dict[str, str] = {}
    try:
        cluster.wait_ready()
    except ProcessFailed as error:
        for name in (*checkpoints, "runtime"):
            rounds.fail(f"exo_{name}", f"node did not start: {error}")
        return urls, instances
    wanted = {
        **{name: checkpoint.path.name for name, checkpoint in checkpoints.items()},
        "runtime": BUILTIN_MODEL_ID,
    }
    for name, model_id in wanted.items():
        try:
            instance = cluster.place(model_id, 1)
        except ProcessFailed as error:
            rounds.fail(f"exo_{name}", f"placing failed: {error}")
            continue
        urls[f"exo_{name}"] = cluster.entry_url(instance)
        instances[name] = str(instance["instance_id"])
        print(f"[{SECTION}] {model_id}: weights={instance.get('weights')} {instance.get('weights_note', '')}")
    return urls, instances


def runner_peaks(node_pid: int, instances: dict[str, str]) -> dict[str, int]:
    """Format -> peak RSS of the runner holding that instance (a child of the node, started with
    `--runner-id INSTANCE@NODE`)."""
    peaks: dict[str, int] = {}
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(node_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error, OSError, ValueError):
                command = child.cmdline()
                runner_id = command[command.index("--runner-id") + 1] if "--runner-id" in command else ""
                for name, instance_id in instances.items():
                    if runner_id.startswith(f"{instance_id}@"):
                        peaks[name] = _vm_hwm(child.pid)
    return peaks


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmHWM for {pid}")


@dataclass
class FormatsRound:
    rounds: Interleaved
    settings: Settings
    checkpoints: dict[str, Checkpoint]
    urls: dict[str, str]
    eos_ids: list[int]

    def model_id(self, setup: str) -> str:
        return (
            MLX_MODEL
            if setup == "mlx_q4"
            else self.checkpoints[setup.removeprefix("exo_").removesuffix("N")].path.name
        )

    def warm_up(self) -> None:
        for setup in ("exo_f32", "exo_bf16", "exo_q4", "mlx_q4"):
            url = self.urls.get(setup)
            if url is not None:
                body = chat_body(self.model_id(setup), user_messages("Warm up", 40), 4, self.eos_ids)
                self.rounds.attempt(setup, lambda url=url, body=body: _ignore(one_chat(url, body)))

    def measure(self, number: int) -> None:
        print(f"[{SECTION}] round {number + 1}/{self.settings.rounds}", flush=True)
        singles: list[tuple[str, Callable[[], dict[str, float]]]] = [
            (setup, lambda setup=setup: self.single(setup, number))
            for setup in ("exo_f32", "exo_bf16", "exo_q4", "mlx_q4")
        ]
        singles.append(("bandwidth", lambda: {"gb_per_s": memory_bandwidth(repeats=3) / 1e9}))
        concurrent: list[tuple[str, Callable[[], dict[str, float]]]] = [
            (f"{setup}N", lambda setup=setup: self.concurrent(setup, number))
            for setup in ("exo_f32", "exo_q4")
        ]
        for group in (singles, concurrent):
            shift = number % len(group)
            for setup, measure in group[shift:] + group[:shift]:
                self.rounds.attempt(setup, measure)

    def url(self, setup: str) -> str:
        url = self.urls.get(setup)
        if url is None:
            raise httpx.ConnectError(f"{setup} is not serving")
        return url

    def single(self, setup: str, number: int) -> dict[str, float]:
        messages = user_messages(f"Question {number:03d} {setup}", self.settings.user_chars)
        # mlx_lm.server decodes this checkpoint at under 1 tok/s here: fewer tokens keep a round
        # short, and decode tok/s does not depend on how many there are.
        tokens = (
            min(self.settings.decode_tokens, MLX_TOKENS) if setup == "mlx_q4" else self.settings.decode_tokens
        )
        body = chat_body(self.model_id(setup), messages, tokens, self.eos_ids)
        timing = one_chat(self.url(setup), body)
        if setup == "mlx_q4":
            return {"decode_tps": timing.decode_tps}
        # Decode reads every weight of the stage once per token: the bytes it holds.
        held = self.checkpoints[setup.removeprefix("exo_")].float32_bytes
        return {"decode_tps": timing.decode_tps, "read_gb_per_s": timing.decode_tps * held / 1e9}

    def concurrent(self, setup: str, number: int) -> dict[str, float]:
        settings = self.settings
        bodies = [
            chat_body(self.model_id(setup),
                      user_messages(f"{setup}N {number:03d}-{index:02d}", settings.concurrent_user_chars),
                      settings.concurrent_tokens, self.eos_ids)
            for index in range(settings.streams)
        ]  # fmt: skip
        return {"aggregate_tps": many_chats(self.url(setup), bodies).aggregate_tps}


def _ignore(_: object) -> dict[str, float]:
    return {}


def _rows(
    rounds: Interleaved, settings: Settings, checkpoints: dict[str, Checkpoint], peaks: dict[str, int]
) -> list[Row]:
    n = settings.streams
    rows = [
        rounds.row("bfloat16 checkpoint, single-stream decode through HTTP", "exo_bf16.decode_tps",
                   "same weights as float32", "exo_f32.decode_tps", "tok/s", target=at_least(0.95)),
        rounds.row("4-bit checkpoint (bfloat16 scales), single-stream decode", "exo_q4.decode_tps",
                   "float32 checkpoint", "exo_f32.decode_tps", "tok/s", target=at_least(1.0)),
        rounds.row("4-bit checkpoint, single-stream decode (the moonshot)", "exo_q4.decode_tps",
                   "float32 checkpoint", "exo_f32.decode_tps", "tok/s", target=at_least(2.0)),
        rounds.row("4-bit checkpoint, bytes of its stage read per second of decode", "exo_q4.read_gb_per_s",
                   "memory bandwidth (numpy copy, all cores)", "bandwidth.gb_per_s", "GB/s",
                   target=at_least(0.5)),
        rounds.row(f"4-bit checkpoint, aggregate of {n} streams", "exo_q4N.aggregate_tps",
                   f"float32 checkpoint, {n} streams", "exo_f32N.aggregate_tps", "tok/s",
                   target=at_least(1.0)),
        rounds.row("4-bit checkpoint, single-stream decode against mlx_lm.server", "exo_q4.decode_tps",
                   "mlx_lm.server on the same checkpoint", "mlx_q4.decode_tps", "tok/s",
                   target=at_least(3.0)),
    ]  # fmt: skip
    runtime = peaks.get("runtime")
    for name in ("f32", "bf16", "q4"):
        what = f"peak RSS of the {name} checkpoint's stage (its representation on the CPU)"
        baseline_name = "that representation + runtime (tiny model's runner)"
        peak = peaks.get(name)
        if peak is None or runtime is None:
            rows.append(failed_row(SECTION, what, baseline_name, at_most(1.2), reason="runner not found"))
            continue
        expected = checkpoints[name].float32_bytes + runtime
        rows.append(
            Row(SECTION, what, Samples((peak / 2**20,), "MiB", "lower"), baseline_name,
                Samples((expected / 2**20,), "MiB", "lower"), at_most(1.2))
        )  # fmt: skip
    for name in ("bf16", "q4"):
        # What the conversion itself costs: the same representation loaded from a float32 file.
        what = f"peak RSS of the {name} checkpoint's stage"
        peak, float32_peak = peaks.get(name), peaks.get("f32")
        if peak is None or float32_peak is None:
            rows.append(
                failed_row(SECTION, what, "float32 checkpoint's stage", at_most(1.05), reason="no runner")
            )
            continue
        rows.append(
            Row(SECTION, what, Samples((peak / 2**20,), "MiB", "lower"),
                "float32 checkpoint's stage, same serving", Samples((float32_peak / 2**20,), "MiB", "lower"),
                at_most(1.05))
        )  # fmt: skip
    return rows


def _details(rounds: Interleaved, checkpoints: dict[str, Checkpoint], peaks: dict[str, int]) -> str:
    lines = [
        "| checkpoint | file | held on the CPU | runner peak RSS |",
        "|---|---:|---:|---:|",
    ]
    for name, checkpoint in checkpoints.items():
        peak = peaks.get(name)
        shown = "—" if peak is None else f"{peak / 2**20:.0f} MiB"
        lines.append(
            f"| {checkpoint.path.name} | {checkpoint.file_bytes / 2**20:.0f} MiB "
            f"| {checkpoint.float32_bytes / 2**20:.0f} MiB | {shown} |"
        )
    if "runtime" in peaks:
        lines.append(
            f"\nRuntime (runner of the built-in tiny model): {peaks['runtime'] / 2**20:.0f} MiB peak RSS."
        )
    lines += ["", "| setup.metric | rounds | min | median | max |", "|---|---|---|---|---|"]
    for key, values in sorted(rounds.samples.items()):
        if values:
            figures = (min(values), statistics.median(values), max(values))
            lines.append(
                f"| {key} | {len(values)} | " + " | ".join(f"{value:.3g}" for value in figures) + " |"
            )
    for setup, reason in sorted(rounds.failures.items()):
        lines.append(f"\n{setup} failed: {reason}")
    return "\n".join(lines)
