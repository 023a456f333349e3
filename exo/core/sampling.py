"""How a request wants its tokens drawn: checked by the API, carried to the stage that samples."""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

MAX_TOP_LOGPROBS: Final = 20


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
