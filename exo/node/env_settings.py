"""Positive numbers read from the environment at start: a bad value stops the node with one line
naming the variable, as a bad flag would, instead of running with a guess."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

Number = TypeVar("Number", int, float)


def positive_setting(name: str, parse: Callable[[str], Number], default: Number, what: str) -> Number:
    """`name`'s value parsed by `parse` (`default` when unset or empty); `what` says in the error
    what the value should be."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError as error:
        raise SystemExit(f"exo: {name}={raw!r} is not {what}") from error
    if value <= 0:
        raise SystemExit(f"exo: {name}={raw!r} must be positive")
    return value
