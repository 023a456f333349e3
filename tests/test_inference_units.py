"""In-process tests of the inference pieces: shards, stage engine, sampling, client routing, models."""

from __future__ import annotations

import asyncio
import gc
import json
import os
from pathlib import Path

import mlx.core as mx
import msgspec
import numpy as np
import pytest
import zmq
import zmq.asyncio

from exo.core.sampling import SamplingParams
from exo.inference.chat_templates import CHATML_TEMPLATE
from exo.inference.client import GenerationError, GenerationRequest, PipelineClient, TokenSink
from exo.inference.models import (
    InvalidModelIdError,
    ModelNotFoundError,
    get_model,
    list_models,
    resolve_model_dir,
)
from exo.inference.protocol import (
    ActivationsSent,
    GenerationCancelled,
    GenerationFailed,
    GenerationStarted,
    StageAlive,
    StageTimed,
    TokenSampled,
    encode,
    pipeline_decoder,
)
from exo.inference.runner import parse_arguments as parse_runner_arguments
from exo.inference.runner import runner_command
from exo.inference.sampling import SeededSampler, TokenSampler, greedy, keep_top_k, keep_top_p, sample_rows
from exo.inference.scheduler import StageScheduler, Work
from exo.inference.shard import ShardLoadError, ShardModel, ShardSpec, load_shard
from exo.inference.stage import Outgoing, PipelineStage, prefill_chunks
from exo.inference.synthetic import (
    BUILTIN_SPEC,
    SyntheticModelSpec,
    ensure_builtin_model,
    parse_arguments,
    write_synthetic_model,
)
from tests.harness.inference_helpers import N_LAYERS, tiny_models

SMALL_SPEC = SyntheticModelSpec(layers=2, hidden=64, intermediate=128, vocab=300)

# --- shards -------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_each_stage_reads_only_its_own_tensors(architecture: str) -> None:
    model = tiny_models()[architecture]
    tied = architecture == "qwen2"
    for start, end in [(0, 2), (2, 4), (4, 6)]:
        gc.collect()
        before = mx.get_active_memory()
        shard = load_shard(model, ShardSpec(start_layer=start, end_layer=end, n_layers=N_LAYERS))
        names = shard.loaded_tensor_names
        layers = {int(name.split(".")[2]) for name in names if name.startswith("model.layers.")}
        assert layers == set(range(start, end))
        assert ("model.embed_tokens.weight" in names) == (start == 0 or (end == N_LAYERS and tied))
        assert ("model.norm.weight" in names) == (end == N_LAYERS)
        assert ("lm_head.weight" in names) == (end == N_LAYERS and not tied)
        # nothing else was materialized: MLX holds this stage's weights and no more
        assert mx.get_active_memory() - before <= shard.weight_bytes * 1.05 + 65536
        del shard


def test_stage_slices_reproduce_the_full_models_logits() -> None:
    model = tiny_models()["qwen2"]
    tokens = mx.array([[3, 50, 70, 90, 11]])
    whole = load_shard(model, ShardSpec(start_layer=0, end_layer=N_LAYERS, n_layers=N_LAYERS))
    expected = whole.forward(tokens, whole.make_cache())
    hidden = tokens
    for start, end in [(0, 1), (1, 5), (5, 6)]:
        stage = load_shard(model, ShardSpec(start_layer=start, end_layer=end, n_layers=N_LAYERS))
        hidden = stage.forward(hidden, stage.make_cache())
    assert mx.array_equal(hidden, expected).item()


def test_shard_load_errors_are_clear(tmp_path: Path) -> None:
    model = tiny_models()["llama"]
    with pytest.raises(ShardLoadError, match="invalid layer range"):
        load_shard(model, ShardSpec(start_layer=3, end_layer=3, n_layers=N_LAYERS))
    with pytest.raises(ShardLoadError, match="the model has 6 layers"):
        load_shard(model, ShardSpec(start_layer=0, end_layer=2, n_layers=8))
    with pytest.raises(ShardLoadError, match="no model at"):
        load_shard(tmp_path / "absent", ShardSpec(start_layer=0, end_layer=2, n_layers=N_LAYERS))


# --- stage engine (sans-IO) -----------------------------------------------------------------------


def test_prefill_chunks_match_mlx_lm() -> None:
    assert prefill_chunks(1, 16) == [(0, 1)]
    assert prefill_chunks(2, 16) == [(0, 1), (1, 2)]
    assert prefill_chunks(40, 16) == [(0, 16), (16, 32), (32, 39), (39, 40)]
    assert prefill_chunks(17, 16) == [(0, 16), (16, 17)]


def test_scheduler_runs_in_arrival_order_and_forgets_dropped_requests() -> None:
    scheduler = StageScheduler()
    for request_id, step in [("a", 0), ("b", 0), ("a", 1), ("c", 0)]:
        scheduler.submit(Work(request_id, step, None, sample=True))
    assert scheduler.drop_request("a") == 2
    assert [scheduler.next(), scheduler.next()] == [Work("b", 0, None, True), Work("c", 0, None, True)]
    assert scheduler.next() is None


def stage_shard(model: Path, start: int, end: int) -> ShardModel:
    return load_shard(model, ShardSpec(start_layer=start, end_layer=end, n_layers=N_LAYERS))


def start_message(
    route: list[str], stage_index: int = 0, prompt: list[int] | None = None
) -> GenerationStarted:
    return GenerationStarted(
        request_id="r1", route=route, reply_to="tcp://requester", prompt_tokens=prompt or [1, 2, 3],
        max_tokens=3, eos_token_ids=[], stage_index=stage_index,
    )  # fmt: skip


def run_all(stage: PipelineStage) -> list[Outgoing]:
    outgoing: list[Outgoing] = []
    while stage.has_work():
        outgoing.extend(stage.run_next())
    return outgoing


def test_stages_wired_without_sockets_generate_and_free_everything() -> None:
    model = tiny_models()["llama"]
    route = ["tcp://s0", "tcp://s1"]
    stages = {
        address: PipelineStage(
            load_shard(model, ShardSpec(start_layer=a, end_layer=b, n_layers=N_LAYERS)), address
        )
        for address, (a, b) in zip(route, [(0, 3), (3, 6)], strict=True)
    }
    to_requester: list[TokenSampled] = []
    timed: list[int] = []
    inbox: list[Outgoing] = [Outgoing("tcp://s0", (encode(start_message(route)),), "r1")]
    while inbox:
        item = inbox.pop(0)
        if item.address == "tcp://requester":
            message = pipeline_decoder.decode(item.frames[0])
            if isinstance(message, StageTimed):  # each stage's timings, as the request ends there
                timed.append(message.timings.stage_index)
                continue
            assert isinstance(message, TokenSampled)
            to_requester.append(message)
            continue
        stage = stages[item.address]
        frames = [bytes(memoryview(frame).cast("B")) for frame in item.frames]
        inbox.extend(stage.handle_frames(frames))
        inbox.extend(run_all(stage))
    assert [sampled.step for sampled in to_requester] == [0, 1, 2]
    assert sorted(timed) == [0, 1]
    assert to_requester[-1].finish_reason == "length"
    for stage in stages.values():
        assert stage.requests == {}
        assert not stage.has_work()
        assert stage.counters.dropped_frames == 0


def test_a_stopping_stage_fails_every_request_it_holds_or_queues() -> None:
    """A runner told to stop tells each requester why, so none waits for a timeout."""
    model = tiny_models()["llama"]
    route = ["tcp://s0", "tcp://s1"]
    first = PipelineStage(
        load_shard(model, ShardSpec(start_layer=0, end_layer=3, n_layers=N_LAYERS)),
        "tcp://s0",
        max_active_requests=1,
        max_waiting_requests=4,
    )
    held = first.handle(start_message(route))
    assert held and "r1" in first.requests
    waiting = msgspec.structs.replace(start_message(route), request_id="r2")
    assert first.handle(waiting) == [] and "r2" in first.admission.waiting
    outgoing = first.fail_all("the runner stopped")
    failures = [
        message
        for item in outgoing
        if item.to_requester
        and isinstance(message := pipeline_decoder.decode(item.frames[0]), GenerationFailed)
    ]
    assert sorted(failure.request_id for failure in failures) == ["r1", "r2"]
    assert {(failure.reason, failure.code) for failure in failures} == {("the runner stopped", "unreachable")}
    assert first.requests == {} and not first.admission.waiting and not first.has_work()


def test_stage_rejects_bad_activations_and_routes() -> None:
    model = tiny_models()["llama"]
    last = PipelineStage(
        load_shard(model, ShardSpec(start_layer=3, end_layer=6, n_layers=N_LAYERS)), "tcp://s1"
    )
    route = ["tcp://s0", "tcp://s1"]
    # a route that puts this last stage first is refused with a reason, and nothing is kept
    [failed] = last.handle(start_message(route, stage_index=0))
    message = pipeline_decoder.decode(failed.frames[0])
    assert isinstance(message, GenerationFailed) and "route mismatch" in message.reason
    assert last.requests == {}
    assert last.handle(start_message(route, stage_index=1)) == []
    good = np.zeros((1, 2, 128), dtype=np.float32)

    def activations(shape: list[int], dtype: str = "float32") -> bytes:
        return encode(ActivationsSent(request_id="r1", step=0, shape=shape, dtype=dtype))

    bad = [
        [activations([1, 2, 64]), good.tobytes()],  # wrong hidden size
        [activations([1, 3, 128]), good.tobytes()],  # shape and buffer disagree
        [activations([1, 2, 128], "int8"), good.tobytes()],  # not a hidden-state dtype
        [activations([2, 1, 128]), good.tobytes()],  # a batch this stage does not run
    ]
    for frames in bad:
        assert last.handle_frames(frames) == []
    assert last.counters.dropped_frames == len(bad)
    assert not last.has_work()
    assert last.handle_frames([activations([1, 2, 128]), good.tobytes()]) == []
    assert last.has_work()


def test_first_stage_refuses_out_of_range_prompt_tokens() -> None:
    model = tiny_models()["llama"]
    first = PipelineStage(
        load_shard(model, ShardSpec(start_layer=0, end_layer=6, n_layers=N_LAYERS)), "tcp://s0"
    )
    [failed] = first.handle(start_message(["tcp://s0"], prompt=[1, 100_000]))
    message = pipeline_decoder.decode(failed.frames[0])
    assert isinstance(message, GenerationFailed) and "prompt token ids" in message.reason
    assert first.requests == {} and not first.has_work()


# --- sampling -----------------------------------------------------------------------------------


def test_top_k_and_top_p_cut_the_distribution() -> None:
    logprobs = mx.log(mx.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert mx.isfinite(keep_top_k(logprobs, 2)).tolist() == [[True, True, False, False, False]]
    assert mx.isfinite(keep_top_p(logprobs, 0.6)).tolist() == [[True, True, False, False, False]]
    assert mx.isfinite(keep_top_p(logprobs, 0.01)).tolist() == [[True, False, False, False, False]]
    assert greedy(logprobs).item() == 0


def test_seeded_sampler_reproduces_its_draws() -> None:
    logprobs = mx.log(mx.softmax(mx.random.normal((1, 50), key=mx.random.key(3))))
    params = SamplingParams(temperature=1.0, seed=11)
    first = [SeededSampler(params)(logprobs).item() for _ in range(1)]
    draws_a, draws_b = SeededSampler(params), SeededSampler(params)
    sequence_a = [draws_a(logprobs).item() for _ in range(20)]
    sequence_b = [draws_b(logprobs).item() for _ in range(20)]
    assert sequence_a == sequence_b and sequence_a[0] == first[0]
    assert len(set(sequence_a)) > 1


def test_a_batch_of_rows_samples_what_each_sampler_does_alone() -> None:
    """sample_rows evaluates a batch's tokens together; each row keeps its own request's sampler
    (greedy, seeded, penalties, log-probabilities) and state, step after step."""
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_p=0.9, seed=5),
        SamplingParams(temperature=1.0, top_k=5, seed=6, logprobs=True, top_logprobs=2),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={7: 3.0}),
    ]
    steps = [mx.random.normal((len(params), 1, 40), key=mx.random.key(step)) for step in range(6)]
    alone = [TokenSampler(param, [1, 2, 3]) for param in params]
    together = [TokenSampler(param, [1, 2, 3]) for param in params]
    for logits in steps:
        rows = [logits[row : row + 1] for row in range(len(params))]
        expected = [sampler(row) for sampler, row in zip(alone, rows, strict=True)]
        assert sample_rows(together, rows) == expected
    with pytest.raises(ValueError):
        sample_rows(together, [steps[0][:1]])


@pytest.mark.parametrize("sampling", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}])
def test_invalid_sampling_params_fail_validation(sampling: dict[str, float]) -> None:
    started = msgspec.to_builtins(start_message(["tcp://s0"]))
    started["sampling"] = sampling
    with pytest.raises(msgspec.ValidationError):
        pipeline_decoder.decode(msgspec.msgpack.encode(started))


# --- client routing (sans-IO) ---------------------------------------------------------------------


async def test_token_sink_routes_by_request_and_counts_the_rest() -> None:
    sink = TokenSink(queue_size=2)
    channel = sink.open_channel("r1")
    with pytest.raises(ValueError, match="already in flight"):
        sink.open_channel("r1")
    sink.deliver([b"junk"], 0.0)
    sink.deliver([encode(TokenSampled(request_id="r1", step=0, token=1)), b"extra"], 0.0)
    sink.deliver([encode(TokenSampled(request_id="other", step=0, token=1))], 0.0)
    sink.deliver([encode(StageAlive(stage_address="tcp://s0", request_ids=["r1", "gone"]))], 5.0)
    assert (sink.dropped_frames, sink.stale_frames) == (2, 1)
    assert channel.stage_seen == {"tcp://s0": 5.0}
    for step in range(3):
        sink.deliver([encode(TokenSampled(request_id="r1", step=step, token=1))], 6.0)
    assert channel.overflowed  # a bounded queue: the third token did not fit
    assert channel.stage_seen == {"tcp://s0": 6.0}  # tokens are news from every stage
    assert channel.queue.qsize() == 2
    await asyncio.sleep(0)


# --- models dir ----------------------------------------------------------------------------------


def test_list_models_describes_and_sizes_models(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    for name, model in tiny_models().items():
        os.symlink(model, root / f"outside-{name}")  # a link out of the models dir is not listed
    write_synthetic_model(root / "tiny", SMALL_SPEC)
    (root / ".hidden-build").mkdir()
    (root / "not-a-model").mkdir()
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    models = {model.model_id: model for model in list_models(root)}
    assert set(models) == {"tiny", "broken"}
    tiny = models["tiny"]
    assert (tiny.architecture, tiny.n_layers, tiny.hidden_size, tiny.dtype) == ("llama", 2, 64, "float32")
    assert tiny.supported and tiny.reason == ""
    assert tiny.total_weight_bytes == (root / "tiny" / "model.safetensors").stat().st_size - _header_size(
        root / "tiny" / "model.safetensors"
    )
    assert tiny.shard_weight_bytes(0, 1) + tiny.shard_weight_bytes(1, 2) == tiny.total_weight_bytes
    assert not models["broken"].supported and "unreadable" in models["broken"].reason


def _header_size(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_model_ids_cannot_escape_the_models_dir(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    os.symlink(tiny_models()["llama"], root / "linked")
    for bad in ["../x", "a/b/c", "a/../b", "a/b@..", "..", ".hidden", "/a", "", "x" * 200]:
        with pytest.raises(InvalidModelIdError):
            resolve_model_dir(root, bad)
    with pytest.raises(InvalidModelIdError, match="outside"):
        resolve_model_dir(root, "linked")
    with pytest.raises(ModelNotFoundError):
        get_model(root, "absent")


def test_unsupported_architectures_are_listed_with_a_reason(tmp_path: Path) -> None:
    root = tmp_path / "models"
    model = write_synthetic_model(
        root / "m", SyntheticModelSpec(layers=2, hidden=64, intermediate=128, vocab=300)
    )
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "mamba"
    (model / "config.json").write_text(json.dumps(config))
    [info] = list_models(root)
    assert not info.supported and "architecture 'mamba' is not supported" in info.reason


# --- synthetic models ----------------------------------------------------------------------------


def test_synthetic_models_are_deterministic_and_atomic(tmp_path: Path) -> None:
    spec = SyntheticModelSpec(layers=2, hidden=64, intermediate=128, vocab=300, seed=5)
    first = write_synthetic_model(tmp_path / "a", spec)
    second = write_synthetic_model(tmp_path / "b", spec)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        write_synthetic_model(tmp_path / "a", spec)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "b"]  # no half-written leftovers


def test_synthetic_cli_refuses_impossible_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_arguments(["out", "--hidden", "100", "--heads", "3"])
    assert "multiple of heads" in capsys.readouterr().err
    out, spec, _shards = parse_arguments(["out", "--arch", "qwen2", "--layers", "3", "--no-tie"])
    assert (out, spec.architecture, spec.layers, spec.tied) == (Path("out"), "qwen2", 3, False)


def test_builtin_model_loads_with_transformers_and_renders_tools(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = ensure_builtin_model(tmp_path)
    assert ensure_builtin_model(tmp_path) == path  # made once
    [info] = list_models(tmp_path)
    assert (info.model_id, info.supported) == ("exo-tiny", True)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert tokenizer.decode(tokenizer.encode("Any text, even ünïcode ✓")) == "Any text, even ünïcode ✓"
    assert tokenizer.eos_token == "<|im_end|>"
    qwen = write_synthetic_model(
        tmp_path / "q", SyntheticModelSpec("qwen2", layers=1, hidden=64, intermediate=64)
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny"},
    ]  # fmt: skip
    rendered = AutoTokenizer.from_pretrained(str(qwen)).apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in rendered
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "<tool_response>\nsunny\n</tool_response>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


async def test_client_refuses_invalid_requests_before_sending() -> None:
    sink = TokenSink()
    await sink.start()
    client = PipelineClient(sink)
    try:
        for request in [
            GenerationRequest([], 4, []),  # empty prompt
            GenerationRequest([1], 0, []),  # no tokens to make
            GenerationRequest([1], 4, [], SamplingParams(temperature=-0.5)),
        ]:
            with pytest.raises(ValueError, match="invalid generation request"):
                await anext(client.generate(["tcp://127.0.0.1:9"], request))
    finally:
        await client.close()
        await sink.close()


async def test_a_reader_cancelled_as_its_token_arrives_still_frees_the_request() -> None:
    """The race behind a runner that went on generating for a client that had gone: the token
    lands in the reader's queue and the reader is cancelled in the same loop turn (Python 3.11's
    asyncio.wait_for returned the token and dropped the cancel)."""
    context = zmq.asyncio.Context()
    first_stage = context.socket(zmq.PULL)
    first_stage.bind("tcp://127.0.0.1:*")
    address = first_stage.getsockopt_string(zmq.LAST_ENDPOINT)
    sink = TokenSink(context=context)
    await sink.start()
    client = PipelineClient(sink, context=context)
    loop = asyncio.get_running_loop()
    try:
        tokens = client.generate([address], GenerationRequest([1, 2], 4, [], request_id="raced"))
        pending = asyncio.ensure_future(anext(tokens))
        assert isinstance(pipeline_decoder.decode(await first_stage.recv()), GenerationStarted)
        for _ in range(5):  # let the reader get to waiting on its queue
            await asyncio.sleep(0)
        sampled = TokenSampled(request_id="raced", step=0, token=7)
        sink.deliver([encode(sampled)], loop.time())
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        cancelled = pipeline_decoder.decode(await first_stage.recv())
        assert cancelled == GenerationCancelled(request_id="raced")
    finally:
        await client.close()
        await sink.close()
        first_stage.close(linger=0)
        context.term()


def test_runner_command_round_trips_through_the_runner_cli() -> None:
    command = runner_command(
        "tcp://127.0.0.1:5000", "r-1", activation_host="0.0.0.0", advertise_host="127.0.0.2"
    )
    assert command[1:3] == ["-m", "exo.inference.runner"]
    options = parse_runner_arguments(command[3:])
    assert (options.control, options.runner_id, options.activation_host, options.advertise_host) == (
        "tcp://127.0.0.1:5000", "r-1", "0.0.0.0", "127.0.0.2",
    )  # fmt: skip
    with pytest.raises(SystemExit):  # every interface but no address to give peers
        parse_runner_arguments(["--control", "tcp://127.0.0.1:5000", "--activation-host", "0.0.0.0"])


async def test_client_reports_a_silent_stage_and_a_missing_token() -> None:
    context = zmq.asyncio.Context()
    first_stage = context.socket(zmq.PULL)  # accepts the start, then never answers
    first_stage.bind("tcp://127.0.0.1:*")
    address = first_stage.getsockopt_string(zmq.LAST_ENDPOINT)
    sink = TokenSink(context=context)
    await sink.start()
    client = PipelineClient(sink, context=context, first_token_timeout=0.5, stage_timeout=0.3)
    loop = asyncio.get_running_loop()
    try:
        request = GenerationRequest([1, 2], 4, [], request_id="silent")
        tokens = client.generate([address], request)
        pending = asyncio.ensure_future(anext(tokens))
        await first_stage.recv()  # the start arrived; now the stage "announces" once and dies
        sink.deliver([encode(StageAlive(stage_address=address, request_ids=["silent"]))], loop.time())
        started = loop.time()
        with pytest.raises(GenerationError, match="stopped responding"):
            await pending
        assert 0.2 < loop.time() - started < 1.0
        cancelled = pipeline_decoder.decode(await first_stage.recv())  # the client frees it everywhere
        assert cancelled == GenerationCancelled(request_id="silent")

        started = loop.time()
        with pytest.raises(GenerationError, match="no token within"):
            await anext(client.generate([address], GenerationRequest([1, 2], 4, [], request_id="quiet")))
        assert 0.4 < loop.time() - started < 1.5

        # A first stage that takes the start but never announces it (a runner stopping with the
        # frame unread): the request ends after accept_timeout, as a gone stage.
        client.accept_timeout = 0.3
        client.first_token_timeout = 60
        started = loop.time()
        with pytest.raises(GenerationError, match="did not take the request") as raised:
            await anext(client.generate([address], GenerationRequest([1, 2], 4, [], request_id="unread")))
        assert raised.value.code == "unreachable"
        assert loop.time() - started < 30

        # A first stage busy with a long pass still announces its other requests: not dead yet.
        pending = asyncio.ensure_future(
            anext(client.generate([address], GenerationRequest([1, 2], 4, [], request_id="behind")))
        )
        for _ in range(10):  # beacons for another request, over three accept timeouts
            sink.deliver([encode(StageAlive(stage_address=address, request_ids=["other"]))], loop.time())
            await asyncio.sleep(0.1)  # the simulated stage's beacon interval
            assert not pending.done()
        with pytest.raises(GenerationError, match="did not take the request"):
            await pending  # the beacons stopped: now it is taken for dead
    finally:
        await client.close()
        await sink.close()
        first_stage.close(linger=0)
        context.term()


def test_the_builtin_model_renders_tools_and_an_old_copy_is_updated(tmp_path: Path) -> None:
    """exo-tiny's template renders tools (so `tools` work on the default model, with mlx-lm's
    json_tools parser); a copy made with the old plain-ChatML template gets the new one, and
    nothing else in the folder changes."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = ensure_builtin_model(tmp_path)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    fresh = load_tokenizer(path)
    assert fresh.tool_call_start == "<tool_call>"
    rendered = fresh.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools, tokenize=False)
    assert "get_weather" in rendered
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHATML_TEMPLATE  # as an older exo wrote it
    config_path.write_text(json.dumps(config))
    weights = (path / "model.safetensors").read_bytes()
    assert ensure_builtin_model(tmp_path) == path
    assert json.loads(config_path.read_text())["chat_template"] == BUILTIN_SPEC.chat_template
    assert (path / "model.safetensors").read_bytes() == weights
    assert sorted(item.name for item in path.iterdir() if item.name.startswith(".")) == []
