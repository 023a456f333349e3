"""What a node does when its disk refuses a write (full, read-only, I/O error).

- The term file is written to a temporary file, fsynced and renamed over the old one; when any
  step fails the temporary file is removed, so a full disk leaves no stale `term.tmp` behind, and
  the caller carries on with the term in memory (the next successful write records the then
  current term). A failed term write must not stop the node's loops: that is how a follower that
  hit ENOSPC during an election used to stop applying events for good.
- A master whose store refuses a write cannot commit anything for anyone: it steps down and
  *abstains* for `ABSTAIN_SECONDS` (it does not campaign, forced or not), so another node is
  elected and commits. After that it competes normally again; if its disk is still full it fails
  its first write and steps down again.
- Any node's refused log write is retried every RETRY_SECONDS until the store takes it
  (exo/node/raft_member.py); a full disk used to fail a follower's step once and leave the node
  never appending the master's events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ABSTAIN_SECONDS = 5.0
RETRY_SECONDS = 0.5


def write_term(path: Path, term: int, voted_for: str | None = None) -> None:
    """Replace `path` with `term` (and the vote cast in it), durably; OSError (nothing left behind)
    when the disk refuses."""
    temporary = path.with_suffix(".tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = (f"{term} {voted_for}\n" if voted_for else f"{term}\n").encode()
            if os.write(descriptor, data) != len(data):
                raise OSError(f"short write to {temporary}")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


@dataclass
class DiskFaults:
    """A node's record of its disk refusing writes: whether it abstains from elections now, and
    one log line per episode rather than one per failed write."""

    abstaining_since: float | None = None
    term_write_failed: bool = False
    store_failures: int = 0

    def store_failed(self, error: Exception, now: float | None = None) -> bool:
        """The master's store refused a commit. True when this starts an abstention (step down now)."""
        self.store_failures += 1
        if self.abstaining_since is not None:
            return False
        self.abstaining_since = time.monotonic() if now is None else now
        logger.error(
            "the event store refused a write (%s): stepping down so another node can sequence; "
            "not standing for election for %.0f s",
            error,
            ABSTAIN_SECONDS,
        )
        return True

    def abstaining(self, now: float | None = None) -> bool:
        if self.abstaining_since is None:
            return False
        if (time.monotonic() if now is None else now) - self.abstaining_since >= ABSTAIN_SECONDS:
            self.abstaining_since = None
            logger.info("standing for election again after the store's failure")
            return False
        return True

    def persist_term(self, path: Path, term: int, voted_for: str | None = None) -> bool:
        """`write_term`, logging a failure once until a write succeeds again. False when it failed
        (the caller must not send the vote it recorded)."""
        try:
            write_term(path, term, voted_for)
        except OSError as error:
            if not self.term_write_failed:
                logger.error(
                    "cannot record term %d in %s (continuing with it in memory): %s", term, path, error
                )
            self.term_write_failed = True
            return False
        if self.term_write_failed:
            logger.info("term %d recorded in %s again", term, path)
        self.term_write_failed = False
        return True
