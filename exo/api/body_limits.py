"""Request bodies and prompts are handled off the event loop, within documented limits.

The node's event loop also runs its heartbeats and (on the master) the sequencer: a request that
holds it for a second costs the node its mastership. So:
- a body is at most `--max-body-bytes` (DEFAULT_MAX_BODY_BYTES, 4 MiB): more is a 413 before it is
  parsed (Litestar counts the bytes as they arrive);
- JSON nested deeper than MAX_JSON_DEPTH is a 400 (msgspec and the json module recurse once per
  level: 200,000 levels raised RecursionError, a 500);
- a body past INLINE_BODY_BYTES is checked and decoded on a worker thread, and every prompt is
  rendered and tokenized on the tokenizer thread (a 15 MB prompt took 55 s to tokenize; the fast
  tokenizers release the GIL while they encode, so the loop keeps running meanwhile);
- after a body past TRIM_AFTER_BYTES the C allocator is asked to give freed memory back to the
  system (glibc keeps a worker thread's arena otherwise).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TypeVar

import msgspec

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 128
INLINE_BODY_BYTES = 64 * 1024
TRIM_AFTER_BYTES = 1024 * 1024

# Two threads for bodies (a big one does not queue the small ones behind it); one for tokenizers,
# which are not safe to call from several threads at once (fast tokenizers raise "Already borrowed").
_BODY_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="exo-api-body")
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exo-api-tokenize")

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")

Decoded = TypeVar("Decoded")
Result = TypeVar("Result")


class TooDeep(ValueError):
    """The JSON nests deeper than the limit."""


def check_json_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """TooDeep when arrays/objects in `body` nest deeper than `limit` (strings are skipped, so a
    bracket inside one does not count). Stops at the first level past the limit."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                raise TooDeep(f"JSON nested deeper than {limit} levels")
        else:
            depth -= 1


def decode_json(body: bytes, body_type: type[Decoded]) -> Decoded:
    """The depth check, then msgspec's strict decode (its errors as they are)."""
    check_json_depth(body)
    return msgspec.json.decode(body, type=body_type)


async def decode_json_off_loop(body: bytes, body_type: type[Decoded]) -> Decoded:
    """`decode_json`, on a worker thread for a body past INLINE_BODY_BYTES."""
    if len(body) <= INLINE_BODY_BYTES:
        return decode_json(body, body_type)
    try:
        return await asyncio.get_running_loop().run_in_executor(_BODY_THREADS, decode_json, body, body_type)
    finally:
        if len(body) >= TRIM_AFTER_BYTES:
            release_freed_memory()


async def on_tokenizer_thread(work: Callable[[], Result]) -> Result:
    """Run tokenizer work (chat template rendering, encoding) on the tokenizer thread."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_THREAD, work)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the C allocator's free memory back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
