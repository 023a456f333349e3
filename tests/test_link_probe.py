"""The link prober over a scripted bus: round trips, bandwidth from the filler, failures."""

from __future__ import annotations

from typing import Any

import pytest

from exo.bus.transport import RequestTimedOut
from exo.core import messages as m
from exo.node import link_probe
from exo.node.link_probe import LinkProber, smoothed


class ScriptedBus:
    node_id = "me"

    def __init__(self, reply: Any = None, fail: bool = False) -> None:
        self.sent: list[tuple[str, int]] = []
        self.reply = reply
        self.fail = fail

    async def request(self, node_id: str, body: m.Request, timeout: float = 2.0) -> m.Reply:
        assert isinstance(body, m.LinkProbed) and timeout == link_probe.PROBE_TIMEOUT
        self.sent.append((node_id, len(body.payload)))
        if self.fail:
            raise RequestTimedOut("unanswered")
        return self.reply or m.LinkProbeAnswered(len(body.payload))


async def test_a_probe_measures_round_trip_and_bandwidth() -> None:
    bus = ScriptedBus()
    prober = LinkProber(bus, lambda: {"me", "peer"})  # pyright: ignore[reportArgumentType]
    await prober.probe("peer", with_bandwidth=True)
    assert bus.sent == [("peer", 0), ("peer", link_probe.BANDWIDTH_PAYLOAD)]
    figures = prober.status()["peer"]
    assert figures["rtt_ms"] is not None and figures["rtt_ms"] > 0
    assert figures["failures"] == 0 and figures["age_s"] is not None


@pytest.mark.parametrize(
    "bus",
    [
        ScriptedBus(fail=True),
        ScriptedBus(reply=m.LinkProbeAnswered(7)),
        ScriptedBus(reply=m.RequestFailed("no")),
    ],
    ids=["unanswered", "wrong-size", "wrong-reply"],
)
async def test_a_failed_probe_counts_and_keeps_no_figure(bus: ScriptedBus) -> None:
    prober = LinkProber(bus, set)  # pyright: ignore[reportArgumentType]
    await prober.probe("peer", with_bandwidth=False)
    assert prober.status()["peer"] == {
        "rtt_ms": None,
        "bandwidth_bytes_per_s": None,
        "age_s": None,
        "failures": 1,
    }


def test_figures_are_smoothed() -> None:
    assert smoothed(None, 10.0) == 10.0
    assert smoothed(10.0, 20.0) == pytest.approx(10.0 + link_probe.SMOOTHING * 10.0)
