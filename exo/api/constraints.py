"""Structured output and forced tool calls -> the grammar the sampling stage enforces.

Every dialect's structured-output field (OpenAI `response_format`, Ollama `format`, Claude
`output_config.format`) becomes an `OutputFormat`, and its tools a `ToolSpec`; `build_grammar`
turns them into one GrammarSpec in llguidance's Lark dialect, which the API compiles (in a
thread) before dispatch, so a schema llguidance cannot handle is a 400 naming what it lacks.

Tool calls are constrained for templates whose calls are `{"name", "arguments"}` JSON between
marker tokens (mlx-lm's `json_tools` format: Hermes, Qwen 2.5, exo-tiny): a forced call is the
whole output; with `tool_choice` "auto" the output is free until the model writes the opening
marker, and the call's JSON must then match one declared tool's `parameters`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import llguidance
import msgspec

from exo.api.cluster_port import ChatTokenizer, text_tokenizer
from exo.api.errors import ApiError
from exo.api.tool_calls import HERMES_CLOSE, HERMES_OPEN
from exo.core.sampling import GrammarSpec

# Compact JSON, as json.dumps writes it: free whitespace would let a model pad without end.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class OutputFormat(msgspec.Struct, frozen=True, kw_only=True):
    """The answer's text must be JSON: any object (`schema` None), or matching `schema`.

    `strict` False (OpenAI's default for `json_schema`) ignores schema keywords llguidance does not
    implement; True refuses them with a 400."""

    schema: dict[str, Any] | None = None
    strict: bool = True
    param: str = "response_format"  # the request field, for errors


class ToolFormat(msgspec.Struct, frozen=True):
    """How a model writes a call: JSON `{"name", "arguments"}` between these markers."""

    start: str
    end: str


def tool_format(tokenizer: ChatTokenizer) -> ToolFormat | None:
    """The call markers as mlx-lm chose its tool parser for the model (tokenizer_utils), or the
    Hermes ones when the template writes them; None for formats a grammar is not built for."""
    parser = getattr(tokenizer, "tool_parser", None)
    start, end = getattr(tokenizer, "tool_call_start", None), getattr(tokenizer, "tool_call_end", None)
    if parser is not None:
        if getattr(parser, "__module__", "") == "mlx_lm.tool_parsers.json_tools" and start and end:
            return ToolFormat(start, end)
        return None
    template = text_tokenizer(tokenizer).chat_template
    if isinstance(template, str) and HERMES_OPEN in template:
        return ToolFormat(HERMES_OPEN, HERMES_CLOSE)
    return None


ToolMode = Literal["auto", "required", "named"]


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Tools offered to the model (`tool_choice` "none" means no ToolSpec at all)."""

    definitions: list[dict[str, Any]]  # OpenAI function tools, as chat templates take them
    mode: ToolMode = "auto"
    name: str | None = None  # the tool that must be called, for mode "named"
    parallel: bool = True
    param: str = "tools"  # the request field, for errors
    strict: list[str] = []  # tools whose schema must be enforced exactly (OpenAI `strict: true`)


def build_grammar(
    tokenizer: ChatTokenizer,
    tools: ToolSpec | None,
    output: OutputFormat | None,
    thinking_end: str | None = None,
) -> GrammarSpec | None:
    """None when nothing constrains the output (no format; tools on a format without a grammar and
    tool_choice "auto"). `thinking_end`: the prompt opened a thinking block, so the constrained
    answer comes after free thinking and this marker."""
    grammar = _grammar(tokenizer, tools, output)
    if grammar is None or grammar.trigger or thinking_end is None:
        return grammar
    lark = grammar.lark.replace("start:", "answer_all:", 1)
    closer = _marker(tokenizer, thinking_end)
    return GrammarSpec(f'start: thinking {closer} answer_all\nthinking[stop=""]: /(?s:.*)/\n{lark}')


def _grammar(
    tokenizer: ChatTokenizer, tools: ToolSpec | None, output: OutputFormat | None
) -> GrammarSpec | None:
    answer = (
        None
        if output is None
        else _json_value(output.schema or {"type": "object"}, lenient=not output.strict)
    )
    if tools is None:
        return None if answer is None else GrammarSpec(f"start: {answer}\n")
    fmt = tool_format(tokenizer)
    if fmt is None:
        if tools.mode != "auto":
            raise ApiError(
                400,
                f"tool_choice {tools.mode!r} cannot be enforced for this model: its tool-call format is "
                "not JSON between markers (use tool_choice 'auto')",
                param="tool_choice",
                code="unsupported_tool_choice",
            )
        if answer is not None:
            raise ApiError(
                400,
                "structured output together with tools needs a model whose tool-call format is JSON "
                "between markers",
                param=output.param if output is not None else "response_format",
                code="unsupported_response_format",
            )
        return None
    opener, closer = _marker(tokenizer, fmt.start), _marker(tokenizer, fmt.end)
    bodies = [_call_body(definition, tools.strict) for definition in tools.definitions]
    rules = [f"body_{index}: {body}" for index, body in enumerate(bodies)]
    body_names = " | ".join(f"body_{index}" for index in range(len(bodies)))
    if tools.mode == "auto" and answer is None:
        trigger = _marker_ids(tokenizer, fmt.start)
        lark = "\n".join([f'start: "\\n" ({body_names}) "\\n" {closer}', *rules]) + "\n"
        return GrammarSpec(lark, trigger=trigger, then="free" if tools.parallel else "end")
    call = f'call: {opener} "\\n" ({body_names}) "\\n" {closer}'
    calls = 'calls: call ("\\n" call)*' if tools.parallel else "calls: call"
    start = "start: calls" if tools.mode != "auto" else f"start: calls | {answer}"
    return GrammarSpec("\n".join([start, calls, call, *rules]) + "\n")


def validate_grammar(grammar: GrammarSpec, param: str) -> None:
    """Compile the grammar as the sampling stage will; a 400 naming what llguidance refused.
    Cost grows with the schema: call it off the event loop."""
    try:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            llguidance.LLMatcher.grammar_from_lark(grammar.lark)
        )
    except (ValueError, RuntimeError) as error:  # documented not to raise on a bad grammar; be sure
        failed, messages = True, [str(error)]
    if failed:
        raise ApiError(
            400, f"the schema is not supported: {_reason(messages)}", param=param, code="unsupported_schema"
        )


def _reason(messages: list[str]) -> str:
    """llguidance's error without the grammar listing it appends: `at 1(8): failed to compile JSON
    schema: Unimplemented keys: ["if"]` -> `Unimplemented keys: ["if"]`."""
    first = (messages[0] if messages else "unknown error").splitlines()[0]
    return first.rpartition("failed to compile JSON schema: ")[2].strip() or first


def _json_value(schema: dict[str, Any], *, lenient: bool) -> str:
    """A Lark `%json` value: the schema with llguidance's layout options."""
    options = {**_JSON_LAYOUT, "lenient": lenient}
    return "%json " + json.dumps({**schema, "x-guidance": options})


def _call_body(definition: dict[str, Any], strict: list[str]) -> str:
    """One tool's call as a JSON object: its name, then arguments matching its parameters."""
    function = definition["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    schema = {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    return _json_value(schema, lenient=function["name"] not in strict)


def _marker_ids(tokenizer: ChatTokenizer, marker: str) -> list[int]:
    return list(text_tokenizer(tokenizer).encode(marker, add_special_tokens=False))


def _marker(tokenizer: ChatTokenizer, marker: str) -> str:
    """The marker as the tokens the model writes it with (`<[id]>`): added tokens like
    `<tool_call>` are whole tokens, which a grammar of plain text would not allow."""
    return "".join(f"<[{token}]>" for token in _marker_ids(tokenizer, marker))
