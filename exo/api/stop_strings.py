"""Stop strings over streamed text: a stop string never reaches the client, even split across tokens.

Text that could still turn out to be the start of a stop string is held back until the next piece
decides it; on a match everything before the stop string is released and the rest is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stop_strings: Sequence[str]) -> None:
        if any(not stop for stop in stop_strings):
            raise ValueError("stop strings must not be empty")
        self._stop_strings = tuple(stop_strings)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that matched

    def feed(self, text: str) -> str:
        """Add generated text; return the text that is safe to show now.

        After a match `stopped` is True and every later call returns "".
        """
        if self.stopped:
            return ""
        buffer = self._held + text
        matches = [(buffer.find(stop), -len(stop), stop) for stop in self._stop_strings if stop in buffer]
        if matches:
            match_at, _, self.matched = min(matches)  # the earliest; the longest of those starting there
            self.stopped = True
            self._held = ""
            return buffer[:match_at]
        held_length = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - held_length :]
        return buffer[: len(buffer) - held_length]

    def flush(self) -> str:
        """The generation ended: what was held back is not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that some stop string starts with."""
        longest = 0
        for stop in self._stop_strings:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
