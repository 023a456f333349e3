"""Constrained decoding on the sampling stage: llguidance masks applied per request, in batches,
with the next step queued ahead, and across pipeline stages. Random weights at temperature 1 pick
anything the mask allows, so every answer that ends must parse and match its schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import mlx.core as mx
import msgspec
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from tokenizers import Tokenizer

from exo.api.constraints import OutputFormat, ToolSpec, build_grammar, tool_format, validate_grammar
from exo.api.errors import ApiError
from exo.core.sampling import GrammarSpec, SamplingParams
from exo.inference.grammar import GrammarConstraint, GrammarError, grammar_tokenizer, make_constraint
from exo.inference.protocol import GenerationFailed, TokenSampled
from exo.inference.sampling import TokenSampler
from exo.inference.synthetic import BUILTIN_SPEC, write_synthetic_model
from tests.harness.inference_helpers import tiny_models
from tests.harness.wired_pipeline import WiredPipeline

SPLITS = {1: [(0, 6)], 2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_models()["qwen2"]  # its template renders tools as Hermes / Qwen 2.5 do


@pytest.fixture(scope="module")
def tokenizer(model: Path) -> Any:
    return load_tokenizer(model)  # mlx-lm's TokenizerWrapper, as the API holds it


@pytest.fixture(scope="module")
def eos(model: Path) -> list[int]:
    return json.loads((model / "config.json").read_text())["eos_token_id"]


@pytest.fixture(scope="module")
def prompt(model: Path) -> list[int]:
    return Tokenizer.from_file(str(model / "tokenizer.json")).encode("Describe the weather in town").ids


def text_of(model: Path, tokens: list[int], eos: list[int]) -> str:
    decoder = Tokenizer.from_file(str(model / "tokenizer.json"))
    return decoder.decode([token for token in tokens if token not in eos], skip_special_tokens=False)


def run_all(
    model: Path, stages: int, grammar: GrammarSpec, prompt: list[int], *, eos: list[int], seeds: range
) -> list[tuple[str, str | None]]:
    """Requests started together (so they batch), each to its end: (text, finish reason)."""
    pipeline = WiredPipeline(model, SPLITS[stages], prefix_cache_tokens=0)
    for seed in seeds:
        sampling = SamplingParams(temperature=1.0, seed=seed, grammar=grammar)
        pipeline.start(f"r{seed}", prompt, 120, sampling, eos_token_ids=eos)
    pipeline.run()
    assert pipeline.idle()
    answers: list[tuple[str, str | None]] = []
    for seed in seeds:
        assert not pipeline.messages(f"r{seed}", GenerationFailed)
        sampled: list[TokenSampled] = pipeline.messages(f"r{seed}", TokenSampled)
        answers.append((text_of(model, [m.token for m in sampled], eos), sampled[-1].finish_reason))
    return answers


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_schema_answers_in_a_batch_all_parse_and_validate(
    model: Path, tokenizer: Any, prompt: list[int], eos: list[int], stages: int
) -> None:
    grammar = build_grammar(tokenizer, None, OutputFormat(schema=PERSON))
    assert grammar is not None
    validate_grammar(grammar, "response_format")
    answers = run_all(model, stages, grammar, prompt, eos=eos, seeds=range(4))
    validator = jsonschema_rs.validator_for(PERSON)
    for text, reason in answers:
        assert reason == "stop", text
        validator.validate(json.loads(text))
    assert len({text for text, _ in answers}) > 1  # seeds differ: not one forced string


def test_one_stage_fed_ahead_gives_the_tokens_of_a_pipeline(
    model: Path, tokenizer: Any, prompt: list[int], eos: list[int]
) -> None:
    """One stage queues each next step on the uncomputed token (the sampler tells the grammar that
    token itself); two stages never do. Same seeds, same answers: the masks saw the same tokens."""
    grammar = build_grammar(tokenizer, None, OutputFormat(schema=PERSON))
    assert grammar is not None
    assert run_all(model, 1, grammar, prompt, eos=eos, seeds=range(3)) == run_all(
        model, 2, grammar, prompt, eos=eos, seeds=range(3)
    )


@pytest.mark.parametrize(
    ("mode", "parallel", "tools"),
    [("required", True, [WEATHER, TIME]), ("required", False, [WEATHER, TIME]), ("named", False, [TIME])],
)
def test_forced_calls_name_a_declared_tool_with_valid_arguments(
    model: Path,
    tokenizer: Any,
    *,
    prompt: list[int],
    eos: list[int],
    mode: str,
    parallel: bool,
    tools: list[Any],
) -> None:
    spec = ToolSpec(definitions=tools, mode=mode, parallel=parallel)  # type: ignore[arg-type]
    grammar = build_grammar(tokenizer, spec, None)
    assert grammar is not None and not grammar.trigger
    validate_grammar(grammar, "tools")
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    parse = tokenizer.tool_parser  # mlx-lm's json_tools parser, which the template implies
    for text, reason in run_all(model, 2, grammar, prompt, eos=eos, seeds=range(4)):
        assert reason == "stop", text
        bodies = [part.split("</tool_call>")[0] for part in text.split("<tool_call>")[1:]]
        assert bodies and (parallel or len(bodies) == 1)
        for body in bodies:
            call = parse(body, tools)
            assert call["name"] in schemas
            jsonschema_rs.validator_for(schemas[call["name"]]).validate(call["arguments"])


def test_auto_tool_choice_constrains_only_after_the_opener(
    model: Path, tokenizer: Any, eos: list[int]
) -> None:
    spec = ToolSpec(definitions=[WEATHER], mode="auto", parallel=False)
    grammar = build_grammar(tokenizer, spec, None)
    assert grammar is not None and grammar.then == "end"
    opener = tokenizer.encode("<tool_call>", add_special_tokens=False)
    assert grammar.trigger == opener
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    constraint = make_constraint(grammar, model, vocab, eos)
    constraint.accept(tokenizer.encode("Sure", add_special_tokens=False)[0])
    assert constraint.mask() is None  # free text
    for token in opener:
        constraint.accept(token)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    allowed = constraint.mask()
    assert allowed is not None and bool(allowed[0, newline[0]]) and int(allowed.sum()) < vocab
    call = '\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
    for token in tokenizer.encode(call, add_special_tokens=False) + tokenizer.encode(
        "</tool_call>", add_special_tokens=False
    ):
        mask = constraint.mask()
        assert mask is not None and bool(mask[0, token])
        constraint.accept(token)
    finished = constraint.mask()  # parallel_tool_calls false: only the end may follow
    assert finished is not None and np.flatnonzero(np.array(finished[0])).tolist() == sorted(eos)


def test_the_sampler_tells_the_grammar_each_token_once_when_drawing_ahead(
    model: Path, eos: list[int]
) -> None:
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    spec = GrammarSpec('start: "ab" "c"\n')
    told: list[int] = []

    class Recording(GrammarConstraint):
        def accept(self, token: int) -> None:
            told.append(token)
            super().accept(token)

    sampler = TokenSampler(
        SamplingParams(), constraint=Recording(spec, grammar_tokenizer(str(model), vocab, tuple(eos)))
    )
    logits = mx.zeros((1, 1, vocab))
    first, logprobs = sampler.draw(logits)
    second, _ = sampler.draw(logits)  # before the first is accepted: the sampler evaluates it
    assert told == [first.item()]
    sampler.accept(int(first.item()), logprobs)  # type: ignore[arg-type]
    sampler.accept(int(second.item()), logprobs)  # type: ignore[arg-type]
    assert told == [first.item(), second.item()]
    text = Tokenizer.from_file(str(model / "tokenizer.json")).decode(told)
    assert "abc".startswith(text)


def test_a_grammar_the_stage_cannot_compile_fails_the_request(
    model: Path, prompt: list[int], eos: list[int]
) -> None:
    with pytest.raises(GrammarError):
        make_constraint(GrammarSpec('start: %json {"type": 5}\n'), model, 1024, eos)
    with pytest.raises(GrammarError, match="folder"):
        make_constraint(GrammarSpec('start: "a"\n'), None, 1024, eos)
    pipeline = WiredPipeline(model, SPLITS[2], prefix_cache_tokens=0)
    sampling = SamplingParams(grammar=GrammarSpec("start: nonsense_rule\n"))
    pipeline.start("bad", prompt, 8, sampling, eos_token_ids=eos)
    pipeline.run()
    (failed,) = pipeline.messages("bad", GenerationFailed)
    assert "does not compile" in failed.reason


def test_the_api_finds_the_call_format_as_mlx_lm_does(tokenizer: Any) -> None:
    found = tool_format(tokenizer)
    assert found is not None and (found.start, found.end) == ("<tool_call>", "</tool_call>")


@pytest.mark.parametrize(
    ("schema", "strict", "refused"),
    [
        ({"type": "object", "if": {}}, True, "Unimplemented keys"),
        ({"type": "object", "if": {}}, False, None),  # not strict: the keyword is ignored
        ({"type": "nothing"}, False, "nothing"),
    ],
)
def test_schemas_llguidance_cannot_compile_are_400(
    tokenizer: Any, schema: dict[str, Any], strict: bool, refused: str | None
) -> None:
    grammar = build_grammar(tokenizer, None, OutputFormat(schema=schema, strict=strict, param="format"))
    assert grammar is not None
    if refused is None:
        validate_grammar(grammar, "format")
        return
    with pytest.raises(ApiError) as raised:
        validate_grammar(grammar, "format")
    assert raised.value.status_code == 400 and raised.value.param == "format" and refused in str(raised.value)


def test_a_prompt_that_opened_thinking_gets_free_thinking_then_the_constrained_answer(tmp_path: Path) -> None:
    """A thinking template opens `<think>` in the prompt: the grammar lets the model think freely,
    then requires `</think>` and the JSON (else the JSON would land in the thinking)."""
    folder = write_synthetic_model(
        tmp_path / "thinker", msgspec.structs.replace(BUILTIN_SPEC, layers=1, template="thinking")
    )
    thinker = load_tokenizer(folder)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    grammar = build_grammar(thinker, None, OutputFormat(schema=schema), thinking_end="</think>")
    assert grammar is not None and grammar.lark.startswith("start: thinking <[")
    validate_grammar(grammar, "response_format")
    config = json.loads((folder / "config.json").read_text())
    constraint = make_constraint(grammar, folder, config["vocab_size"], config["eos_token_id"])
    text = thinker.encode("Let me think: five.", add_special_tokens=False)
    answer = thinker.encode('{"a": 5}', add_special_tokens=False)
    for token in [*text, *thinker.encode("</think>", add_special_tokens=False), *answer]:
        mask = constraint.mask()
        assert mask is not None and bool(mask[0, token])
        constraint.accept(token)
    brace = thinker.encode("{", add_special_tokens=False)[0]
    final = constraint.mask()
    assert final is not None and not bool(final[0, brace])  # the JSON is complete: it may only end
    assert all(bool(final[0, token]) for token in config["eos_token_id"])
