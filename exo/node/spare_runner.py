"""A warm spare runner: one runner process per node that has started its interpreter, loaded BLAS
and imported mlx and the model code before any placement, and becomes a stage's runner when one
arrives (it is told its runner id on stdin).

Why: a placement's runners used to pay those imports (~0.4 s of CPU each) while the stage's files
download; on a machine where nodes share cores that CPU comes out of the download. A spare pays it
while the node is idle. The replacement for a spare taken starts only once no runner of this node
has been starting, waiting for files or loading for a few seconds, so it does not compete with a
placement in progress (here or, on a machine shared by several nodes, on the other stages' nodes).

Cost: one idle process per node holding mlx's libraries (about 70 MB resident, 31 MB of it its
own; docs/models.md). `EXO_SPARE_RUNNER=0` in the node's environment turns it off: runners then
start on each placement as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping

from exo.inference.runner_options import SPARE_FLAG

logger = logging.getLogger(__name__)

SPARE_ENVIRONMENT = "EXO_SPARE_RUNNER"
SPARE_STOP_SECONDS = 3.0
# How long the node must have had no runner starting or loading before a replacement spare starts.
SPARE_IDLE_SECONDS = 3.0


def spare_enabled(environment: Mapping[str, str] = os.environ) -> bool:
    """Whether the node keeps a spare runner (`EXO_SPARE_RUNNER`: on unless 0/false/no/off)."""
    value = environment.get(SPARE_ENVIRONMENT, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{SPARE_ENVIRONMENT} must be 1 or 0 (on or off), not {value!r}")


class SpareRunner:
    """At most one spare runner process; `argv(runner_id)` is the command a runner starts with."""

    def __init__(self, argv: Callable[[str], list[str]], environment: Mapping[str, str]) -> None:
        self._argv = argv
        self._environment = dict(environment)
        self.process: asyncio.subprocess.Process | None = None
        self.closed = False
        self.idle_seconds = SPARE_IDLE_SECONDS
        self._busy_at: float | None = None  # when the node was last seen placing a stage

    async def keep(self, *, busy: bool) -> None:
        """Start a spare when there is none and the node has not been busy placing a stage for
        `idle_seconds` (the first spare, before any placement, starts at once)."""
        now = time.monotonic()
        if busy:
            self._busy_at = now
        if self.closed or busy or (self.process is not None and self.process.returncode is None):
            return
        if self._busy_at is not None and now - self._busy_at < self.idle_seconds:
            return
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self._argv("spare"), SPARE_FLAG, env=self._environment, stdin=asyncio.subprocess.PIPE
            )
        except OSError as error:
            logger.warning("no spare runner: %s", error)
            self.closed = True  # it would fail the same way each time; runners start on placement

    async def take(self, runner_id: str) -> asyncio.subprocess.Process | None:
        """The spare, told it is runner `runner_id`; None when there is none alive."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None or process.stdin is None:
            return None
        try:
            process.stdin.write(f"{runner_id}\n".encode())
            await process.stdin.drain()
            process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            await _stop(process)
            return None
        return process

    async def close(self) -> None:
        self.closed = True
        process, self.process = self.process, None
        if process is not None:
            await _stop(process)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """End of input tells a spare to exit; kill one that does not within a few seconds."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        async with asyncio.timeout(SPARE_STOP_SECONDS):
            await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
