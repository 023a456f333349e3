"""How a request wants its tokens drawn: checked by the API, carried to the stage that samples."""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

MAX_TOP_LOGPROBS: Final = 20


class GrammarSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A constraint on a request's tokens, applied where they are sampled (the last stage).

    `lark` is a grammar in llguidance's Lark dialect (JSON schemas are embedded as `%json {...}`,
    marker tokens as `<[id]>`); the API builds and validates it before dispatch. With `trigger`
    empty the grammar covers the whole output. Otherwise the output is free until the model emits
    the `trigger` tokens (a tool-call opener), and the grammar covers what follows them; when it is
    complete the output is free again (`then` "free") or must end (`then` "end").
    """

    lark: Annotated[str, msgspec.Meta(min_length=1)]
    trigger: list[int] = []
    then: Literal["free", "end"] = "free"


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: no top-k cut
    seed: int | None = None  # same seed, prompt and params: same tokens
    # Everything below defaults to "off", so frames from before these fields decode unchanged.
    min_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0  # drop tokens below min_p x the top one
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] = 0.0  # per token seen in the output
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)] = 0.0  # per occurrence in the output
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] = 1.0  # prompt + output, as mlx-lm
    logit_bias: dict[int, Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]] = {}
    logprobs: bool = False  # send the sampled token's log-probability
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] = 0  # and this many alternatives
    grammar: GrammarSpec | None = None  # constrained decoding (structured output, forced tool calls)
