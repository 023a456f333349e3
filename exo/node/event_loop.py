"""The event loop a node runs on: uvloop's where it is installed, asyncio's own otherwise.

A node's quorum path is many small wake-ups (bus messages, store writes returning from their
thread), and on a small machine the tail of an event's latency is the node processes waiting for
a core: uvloop's loop (libuv, in C) spends less CPU per wake-up than asyncio's selector loop
(docs/benchmarks.md, issue 18). pyzmq's asyncio sockets watch their file descriptor with
`add_reader`, which uvloop provides. `EXO_EVENT_LOOP=asyncio` picks asyncio's loop (to compare,
or to rule the loop out when chasing a bug); `uvloop` requires it.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_Result = TypeVar("_Result")

ENVIRONMENT = "EXO_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop for `choice` (default: `EXO_EVENT_LOOP`, else "auto"); None means
    asyncio's own. "auto" is uvloop when it imports, asyncio's otherwise."""
    raw = os.environ.get(ENVIRONMENT, "") if choice is None else choice
    wanted = raw.strip().lower() or "auto"
    if wanted not in CHOICES:
        raise SystemExit(f"exo: {ENVIRONMENT}={raw!r} is not one of {', '.join(CHOICES)}")
    if wanted == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as error:
        if wanted == "uvloop":
            raise SystemExit(f"exo: {ENVIRONMENT}=uvloop but uvloop is not installed ({error})") from error
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, _Result], choice: str | None = None) -> _Result:
    """`asyncio.run(main)` on the loop `loop_factory(choice)` picks."""
    try:
        factory = loop_factory(choice)
    except BaseException:
        main.close()  # never awaited: close it so Python does not warn about it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
