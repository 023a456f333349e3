"""What a stage keeps per request, and the counters it reports (RunnerStats)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exo.inference.sampling import TokenSampler
from exo.inference.timings import RequestTimings


@dataclass
class RequestState:
    request_id: str
    route: list[str]
    reply_to: str
    stage_index: int
    max_tokens: int
    eos_token_ids: frozenset[int]
    cache: list[Any]
    sampler: TokenSampler | None = None
    tokens_sampled: int = 0
    cached_tokens: int = 0  # prompt positions taken from the prefix cache
    store_prefix: bool = False  # a PrefixCached follows the end: the last stage keeps the cache
    tokens: list[int] = field(default_factory=list)  # first stage: prompt, then each token fed
    timings: RequestTimings = field(default_factory=RequestTimings)  # for the requester's trace

    @property
    def next_address(self) -> str | None:
        following = self.stage_index + 1
        return self.route[following] if following < len(self.route) else None


@dataclass
class StageCounters:
    steps_done: int = 0
    requests_started: int = 0
    tokens_sampled: int = 0
    dropped_frames: int = 0  # malformed or impossible here
    stale_frames: int = 0  # for a request this stage does not hold (finished or cancelled)
    batched_steps: int = 0  # passes that ran several requests at once
    batched_rows: int = 0
    largest_batch: int = 0
    grouped_prompt_chunks: int = 0  # prompt chunks prefilled in one pass with other requests' chunks
    prefix_cache_hits: int = 0
    cached_prompt_tokens: int = 0
