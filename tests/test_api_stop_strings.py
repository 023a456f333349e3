"""Stop strings over streamed text."""

from __future__ import annotations

import pytest

from exo.api.stop_strings import StopStringMatcher


@pytest.mark.parametrize(
    ("stops", "pieces", "shown", "stopped"),
    [
        (["END"], ["abc", "def"], ["abc", "def"], False),
        (["END"], ["abcE", "N", "Dxyz"], ["abc", "", ""], True),  # split over three pieces
        (["END"], ["abcEN", "Q"], ["abc", "ENQ"], False),  # a false alarm is released
        (["END"], ["xEND"], ["x"], True),
        (["END"], ["END"], [""], True),
        (["\n\n", "User:"], ["Hi", "\n", "Us", "er:"], ["Hi", "", "\n", ""], True),  # earliest wins
        (["ab", "b"], ["xab"], ["x"], True),  # both match; the earlier position wins
        (["aab"], ["aa", "aab"], ["", "aa"], True),  # overlapping prefixes: "aa" + "aab" = "aa" + stop
        (["é!"], ["café", "!"], ["caf", ""], True),  # non-ASCII
    ],
)
def test_matcher_table(stops: list[str], pieces: list[str], shown: list[str], stopped: bool) -> None:
    matcher = StopStringMatcher(stops)
    assert [matcher.feed(piece) for piece in pieces] == shown
    assert matcher.stopped == stopped
    assert (matcher.matched is not None) == stopped


@pytest.mark.parametrize(
    ("stops", "text", "matched"),
    [
        (["b", "ab"], "xab", "ab"),
        (["ab", "abc"], "xabc", "abc"),
        (["c", "ab"], "abc", "ab"),
        (["q"], "abc", None),
    ],
)
def test_matcher_says_which_stop_string_matched(stops: list[str], text: str, matched: str | None) -> None:
    """The earliest match; of several starting there, the longest (Claude reports it)."""
    matcher = StopStringMatcher(stops)
    matcher.feed(text)
    assert matcher.matched == matched


def test_held_text_is_released_by_flush() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("abcEN") == "abc"
    assert matcher.flush() == "EN"
    assert matcher.flush() == ""


def test_nothing_after_a_stop() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("aEND") == "a"
    assert matcher.feed("more") == ""
    assert matcher.flush() == ""


def test_no_stop_strings_holds_nothing() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == "anything"
    assert not matcher.stopped


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        StopStringMatcher(["ok", ""])
