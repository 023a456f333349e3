"""WAL checkpoints off the commit path: a thread of the store's own runs them.

By default SQLite checkpoints inside the commit that takes the WAL past 1,000 pages: that commit
copies the pages back into the database file and syncs it before it returns. At 1,000 events/s (a
page per commit) that is about once a second, and the master's sequencer waits for its commit: a
stall on the event path every second (docs/benchmarks-store.md has the figures).

So every connection to a log turns automatic checkpoints off (`apply_log_pragmas`), and this
thread runs a PASSIVE checkpoint every `CHECKPOINT_INTERVAL_SECONDS`: PASSIVE neither waits for nor
blocks the writer and readers; it copies what no reader still needs, and the next write starts the
WAL over once all of it is copied. The WAL holds at most about one interval of writes (at the
store's 64k events/s, a few MB). When the last connection closes SQLite checkpoints what is left
and removes the WAL, as before.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Literal

from exo.store.location import Synchronous
from exo.store.sqlite_writer import connect_to_log

logger = logging.getLogger(__name__)

CHECKPOINT_INTERVAL_SECONDS = 0.5

CheckpointerLifecycle = Literal["created", "running", "stopped"]


class WalCheckpointer:
    """A thread running `PRAGMA wal_checkpoint(PASSIVE)` on its own connection every interval."""

    def __init__(
        self,
        path: Path,
        synchronous: Synchronous,
        busy_timeout_ms: int,
        interval_seconds: float = CHECKPOINT_INTERVAL_SECONDS,
    ) -> None:
        self._path = path
        self._synchronous: Synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="exo-wal-checkpoint", daemon=True)
        self.lifecycle: CheckpointerLifecycle = "created"
        self.checkpoints = 0
        # SQLite's answer to the last checkpoint: (1 if it could not run, WAL frames, frames copied).
        self.last_result: tuple[int, int, int] | None = None
        self.failures = 0
        self.last_error: str | None = None

    def start(self) -> None:
        if self.lifecycle != "created":
            raise RuntimeError(f"a checkpointer that is {self.lifecycle} cannot start")
        self.lifecycle = "running"
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait for the thread (at most one checkpoint's time)."""
        if self.lifecycle == "running":
            self._stop.set()
            self._thread.join()
        self.lifecycle = "stopped"

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(self._interval_seconds):
                try:
                    if connection is None:
                        connection = connect_to_log(self._path, self._synchronous, self._busy_timeout_ms)
                    busy, frames, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as error:
                    self._failed(str(error))
                else:
                    self.last_result = (int(busy), int(frames), int(copied))
                    self.checkpoints += 1
                    self.last_error = None
        finally:
            if connection is not None:
                connection.close()

    def _failed(self, error: str) -> None:
        # Logged when the error changes, not every interval: the next checkpoint retries anyway,
        # and until one succeeds the WAL only grows (no event is at risk).
        self.failures += 1
        if error != self.last_error:
            logger.warning(
                "WAL checkpoint of %s failed (retrying every %ss): %s",
                self._path,
                self._interval_seconds,
                error,
            )
        self.last_error = error
