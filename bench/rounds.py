"""Interleaved measurement rounds: every setup once per round (A, B, A, B, ...), so load from other
processes on a shared machine falls on all of them alike. A setup that could not start is skipped
for good; a measurement that fails (a request refused or cut short) is counted and tried again next
round. Rows say what failed instead of vanishing."""

from __future__ import annotations

import sys
from collections.abc import Callable

import httpx

from bench.processes import ProcessFailed
from bench.suite import Better, Row, Samples, Target, failed_row


class Interleaved:
    def __init__(self, section: str) -> None:
        self.section = section
        self.samples: dict[str, list[float]] = {}
        self.failures: dict[str, str] = {}  # setups that could not start: never measured
        self.errors: dict[str, list[str]] = {}  # failed measurements, per setup, first line each

    def fail(self, setup: str, reason: str) -> None:
        self.failures.setdefault(setup, reason)

    def attempt(self, setup: str, measure: Callable[[], dict[str, float]]) -> dict[str, float] | None:
        """Run one measurement of `setup`; its figures are appended as `setup.metric` samples."""
        if setup in self.failures:
            return None
        try:
            values = measure()
        except (ProcessFailed, httpx.HTTPError, OSError) as error:
            message = str(error) or type(error).__name__
            print(f"[{self.section}] {setup} failed: {message}", file=sys.stderr, flush=True)
            self.errors.setdefault(setup, []).append(message.splitlines()[0])
            return None
        for metric, value in values.items():
            self.samples.setdefault(f"{setup}.{metric}", []).append(value)
        return values

    def values(self, key: str) -> list[float]:
        return self.samples.get(key, [])

    def row(
        self,
        what: str,
        measured: str,
        baseline_name: str,
        baseline: str,
        unit: str,
        *,
        better: Better = "higher",
        target: Target | None = None,
        note: str = "",
        baseline_unit: str | None = None,
    ) -> Row:
        """A summary row from two recorded series (`setup.metric` keys); failed measurements of
        either side are named in the note, or make the row "not measured" when nothing succeeded."""
        notes = [note] if note else []
        for key in (measured, baseline):
            setup = key.split(".", 1)[0]
            errors = self.errors.get(setup, [])
            if setup in self.failures:
                return failed_row(
                    self.section, what, baseline_name, target, reason=self.failures[setup], note=note
                )
            if not self.samples.get(key):
                reason = f"every attempt failed: {errors[0]}" if errors else f"no samples of {key}"
                return failed_row(self.section, what, baseline_name, target, reason=reason, note=note)
            if errors:
                notes.append(f"{setup}: {len(errors)} failed attempt(s), first: {errors[0]}")
        note = "; ".join(notes)
        return Row(
            self.section,
            what,
            Samples(tuple(self.samples[measured]), unit, better),
            baseline_name,
            Samples(tuple(self.samples[baseline]), baseline_unit or unit, better),
            target,
            note,
        )
