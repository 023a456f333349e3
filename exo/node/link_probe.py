"""Per-peer link figures for `/node_status` (`links`) and `/metrics`: a bus round trip every couple
of seconds to each alive peer, and now and then one carrying filler to estimate bandwidth.

Cheap by design: one tiny request per peer per `PROBE_SECONDS`, and `BANDWIDTH_PAYLOAD` bytes once
every `BANDWIDTH_EVERY` rounds. The figures are smoothed (EWMA) and local: never in the log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from exo.bus.transport import Bus, RequestTimedOut
from exo.core import messages as m

PROBE_SECONDS: Final = 2.0
PROBE_TIMEOUT: Final = 1.0
BANDWIDTH_EVERY: Final = 5
BANDWIDTH_PAYLOAD: Final = 256 * 1024
SMOOTHING: Final = 0.3


class LinkFigures:
    __slots__ = ("bandwidth", "failures", "measured_at", "rtt_s")

    def __init__(self) -> None:
        self.rtt_s: float | None = None
        self.bandwidth: float | None = None
        self.measured_at = 0.0
        self.failures = 0


def smoothed(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + SMOOTHING * (sample - previous)


class LinkProber:
    """Measures the links to `alive_peers()` (node ids) over `bus` while running."""

    def __init__(self, bus: Bus, alive_peers: Callable[[], set[str]]) -> None:
        self.bus = bus
        self.alive_peers = alive_peers
        self.links: dict[str, LinkFigures] = {}
        self._task: asyncio.Task[None] | None = None
        self._round = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="link-probe")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def status(self) -> dict[str, dict[str, float | int | None]]:
        now = time.monotonic()
        return {
            node_id: {
                "rtt_ms": None if link.rtt_s is None else round(link.rtt_s * 1000, 3),
                "bandwidth_bytes_per_s": None if link.bandwidth is None else round(link.bandwidth),
                "age_s": round(now - link.measured_at, 1) if link.measured_at else None,
                "failures": link.failures,
            }
            for node_id, link in sorted(self.links.items())
        }

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            self._round += 1
            peers = self.alive_peers() - {self.bus.node_id}
            for gone in set(self.links) - peers:
                del self.links[gone]
            await asyncio.gather(*(self.probe(peer, self._round % BANDWIDTH_EVERY == 0) for peer in peers))

    async def probe(self, node_id: str, with_bandwidth: bool) -> None:
        link = self.links.setdefault(node_id, LinkFigures())
        try:
            rtt = await self._round_trip(node_id, b"")
            link.rtt_s = smoothed(link.rtt_s, rtt)
            if with_bandwidth:
                loaded = await self._round_trip(node_id, bytes(BANDWIDTH_PAYLOAD))
                extra = loaded - rtt
                if extra > 0:
                    link.bandwidth = smoothed(link.bandwidth, BANDWIDTH_PAYLOAD / extra)
            link.measured_at = time.monotonic()
        except RequestTimedOut:
            link.failures += 1

    async def _round_trip(self, node_id: str, payload: bytes) -> float:
        started = time.perf_counter()
        reply = await self.bus.request(node_id, m.LinkProbed(payload), timeout=PROBE_TIMEOUT)
        if not isinstance(reply, m.LinkProbeAnswered) or reply.payload_bytes != len(payload):
            raise RequestTimedOut(f"unexpected answer to a link probe: {type(reply).__name__}")
        return time.perf_counter() - started
