"""What the cluster secret costs: events/s through the cluster and activation MB/s, with and without CURVE.

    python -m bench.curve_bench [--events 30000] [--megabytes 256]

Activation throughput: a PUSH/PULL pair on loopback moving 1 MiB frames (a hidden state is a few
KiB to a few MiB), plain vs CURVE, interleaved, best of 3. Events: bench.events_bench's whole path,
once open and once with a secret. Target: each >= 0.8x of the open bus.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import threading
import time
from datetime import UTC, datetime

import zmq

from bench.events_bench import measure
from exo.bus.security import derive_security, start_thread_authenticator
from exo.bus.sockets import apply_curve

FRAME_BYTES = 1024 * 1024
SECRET = "benchmark secret"


def activation_megabytes_per_second(megabytes: int, secret: str | None) -> float:
    security = derive_security(secret)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    authenticator = start_thread_authenticator(context, security)
    pull = context.socket(zmq.PULL)
    apply_curve(pull, security, server=True)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = context.socket(zmq.PUSH)
    apply_curve(push, security, server=False)
    push.connect(f"tcp://127.0.0.1:{port}")
    frame = os.urandom(FRAME_BYTES)
    push.send(frame)  # the handshake, outside the timing
    pull.recv()

    def send_all() -> None:
        for _ in range(megabytes):
            push.send(frame, copy=False)

    started = time.perf_counter()
    sender = threading.Thread(target=send_all)
    sender.start()
    for _ in range(megabytes):
        pull.recv(copy=False)
    elapsed = time.perf_counter() - started
    sender.join()
    push.close(linger=0)
    pull.close(linger=0)
    if authenticator is not None:
        authenticator.stop()
    context.term()
    return megabytes / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--megabytes", type=int, default=256)
    arguments = parser.parse_args()
    plain_rates: list[float] = []
    curve_rates: list[float] = []
    for _ in range(3):  # interleaved, so both see the same machine
        plain_rates.append(activation_megabytes_per_second(arguments.megabytes, None))
        curve_rates.append(activation_megabytes_per_second(arguments.megabytes, SECRET))
    plain_events = asyncio.run(measure(arguments.events, 1000, 3.0, "full"))
    curve_events = asyncio.run(measure(arguments.events, 1000, 3.0, "full", SECRET))
    plain, curve = max(plain_rates), max(curve_rates)
    print(
        f"# CURVE cost, {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    print()
    print("| measure | open bus | with secret (CURVE) | ratio | target |")
    print("|---|---|---|---|---|")
    ratio = curve / plain
    print(
        f"| activation MB/s, 1 MiB frames, best of 3 | {plain:,.0f} | {curve:,.0f} | {ratio:.2f}x "
        f"| ≥ 0.8x {'✓' if ratio >= 0.8 else '✗'} |"
    )
    ratio = curve_events.all_rate / plain_events.all_rate
    print(
        f"| events/s to all 3 nodes | {plain_events.all_rate:,.0f} | {curve_events.all_rate:,.0f} "
        f"| {ratio:.2f}x | ≥ 0.8x {'✓' if ratio >= 0.8 else '✗'} |"
    )


if __name__ == "__main__":
    main()
