"""A minimal process that runs `Discovery` and prints one JSON line per event (used inside namespaces).

    python tests/harness/discovery_peer.py --node-id A --bus-port 52414 [--cluster-tag T] [--address IP]

Lines: {"event": "started", "addresses": [...]}, {"event": "found", "node_id", "address"},
{"event": "lost", "node_id"}, {"event": "ignored", "reason", "count"}. Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal

from exo.bus.discovery import Discovery

REJECTION_POLL_SECONDS = 0.1


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--bus-port", type=int, required=True)
    parser.add_argument("--cluster-tag")
    parser.add_argument("--address", action="append", dest="addresses")
    arguments = parser.parse_args()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    discovery = Discovery(
        arguments.node_id,
        arguments.bus_port,
        lambda node_id, address: emit(event="found", node_id=node_id, address=address),
        lambda node_id: emit(event="lost", node_id=node_id),
        addresses=arguments.addresses,
        cluster_tag=arguments.cluster_tag,
    )
    await discovery.start()
    emit(event="started", addresses=discovery.announced_addresses)
    reported: dict[str, int] = {}
    try:
        while not stop.is_set():
            # Rejections have no callback; report new counts so tests can prove a peer was seen and ignored.
            for reason, count in discovery.rejections.items():
                if reported.get(reason) != count:
                    reported[reason] = count
                    emit(event="ignored", reason=reason, count=count)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REJECTION_POLL_SECONDS)
    finally:
        await discovery.close()
        emit(event="closed")


if __name__ == "__main__":
    asyncio.run(main())
