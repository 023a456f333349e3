"""The dashboard's costs, measured in Debian's chromium (run by hand: `python -m bench.dashboard_bench`).

1. First paint of `GET /` on loopback with a cold cache (a fresh browser profile each round), and
   the time until the page shows the cluster (its first feed frame rendered).
2. An event applied on the node, visible in the page: 3-node cluster, the page on node0; the clock
   starts when the request that makes the event is sent (so the figure is an upper bound: it also
   holds the command's round trip to the master), and stops when the page's MutationObserver sees
   the instance's row. p50 and p95.
3. Single-stream decode with the dashboard open and `/metrics` scraped every second, against neither;
   rounds interleaved on the same node, in ABBA order (so a load that drifts during the run does not
   favour one side): the ratio of medians, each round pair's ratio (median and spread), and the node
   process's own CPU time per token (its event loop: the API, the feed, the scrape; not the runner),
   a figure that other work on a shared machine blurs far less than tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import httpx
import psutil
from selenium.webdriver.common.by import By

from tests.harness.browser import chromium, js, wait_for
from tests.harness.cluster_harness import LoopbackCluster, wait_until

ROUNDS_PAINT = 5
ROUNDS_EVENTS = 12
ROUNDS_DECODE = 4
DECODE_TOKENS = 200


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def first_paint(url: str) -> tuple[float, float]:
    with chromium() as driver:  # a new profile: nothing cached
        driver.get(url)
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]"), 20, "nodes")
        paint = js(driver, "return performance.getEntriesByName('first-contentful-paint')[0]?.startTime")
        shown = js(driver, "return performance.now()")  # an upper bound: when the poll saw the rows
        return float(paint), float(shown)


def event_latencies(cluster: LoopbackCluster) -> list[float]:
    node = cluster.nodes[0]
    latencies: list[float] = []
    with chromium() as driver:
        driver.get(node.url + "/")
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]"), 20, "nodes")
        js(
            driver,
            """window.seen = {};
            new MutationObserver(() => {
              for (const row of document.querySelectorAll('#instances tr[data-instance]'))
                window.seen[row.dataset.instance] ??= performance.timeOrigin + performance.now();
            }).observe(document.getElementById('instances'), {subtree: true, childList: true});""",
        )
        for _ in range(ROUNDS_EVENTS):
            sent = time.time() * 1000
            response = node.post("/place_instance", {"model_id": "exo-tiny", "min_nodes": 1})
            response.raise_for_status()
            instance_id = response.json()["instance_id"]
            seen = wait_for(
                driver, lambda d, i=instance_id: js(d, "return window.seen[arguments[0]]", i), 10, "row"
            )
            latencies.append(float(seen) - sent)
            httpx.delete(f"{node.url}/instance/{instance_id}", timeout=30).raise_for_status()
            wait_until(lambda i=instance_id: i not in node.state()["instances"], 30, "deleted")
    return latencies


class Decoded(NamedTuple):
    tokens_per_s: float  # the client's: tokens over the time from sending the request to the last one
    node_tokens_per_s: float  # the node's own (its trace: first token to last, as its API saw them)
    pass_ms: float  # the runner's mean forward pass (the trace's stage figures)
    node_cpu_ms_per_token: float


FIGURES = {
    "client tok/s (request sent to last token)": lambda d: d.tokens_per_s,
    "node tok/s (its trace)": lambda d: d.node_tokens_per_s,
    "runner pass ms (its trace, mean)": lambda d: d.pass_ms,
    # What a token takes beyond the runner's pass: sampling, the node's loop, the API, the stream.
    # Work the dashboard or a scrape added per token would show here, not blurred by how fast the
    # shared machine let the runner compute.
    "ms/token outside the pass": lambda d: (
        1000 / d.node_tokens_per_s - d.pass_ms if d.node_tokens_per_s else 0.0
    ),
    "node CPU ms/token": lambda d: d.node_cpu_ms_per_token,
}


def decode_rate(url: str, node: psutil.Process | None = None) -> Decoded:
    """One streamed answer. The client's rate counts from the request's sending, not its first
    token: on a starved machine the client reads tokens in bursts, and a burst at the start made
    first-to-last rates of 1,000+ tok/s."""
    body = {
        "model": "exo-tiny",
        "messages": [{"role": "user", "content": "Tell me about the tide and the moon."}],
        "max_tokens": DECODE_TOKENS,
        "stream": True,
        "temperature": 0,
    }
    last = None
    tokens = 0
    completion_id = ""
    before = node.cpu_times() if node is not None else None
    sent = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                last = time.perf_counter()
                tokens += 1
                completion_id = completion_id or json.loads(line[6:])["id"]
    assert last is not None and tokens > 10, tokens
    cpu_ms = 0.0
    if node is not None and before is not None:
        after = node.cpu_times()
        cpu_ms = (after.user + after.system - before.user - before.system) * 1000
    trace = httpx.get(f"{url}/v1/traces/{completion_id}", timeout=10).json()
    stages = trace.get("stages") or [{}]
    pass_ms = float(stages[0].get("pass_ms", {}).get("mean", 0.0))
    return Decoded(tokens / (last - sent), float(trace["tokens_per_second"] or 0.0), pass_ms, cpu_ms / tokens)


class DecodeRounds(NamedTuple):
    plain: list[Decoded]
    watched: list[Decoded]

    def ratio_of_medians(self, figure: Callable[[Decoded], float]) -> float:
        return statistics.median(map(figure, self.watched)) / statistics.median(map(figure, self.plain))

    def pair_ratios(self, figure: Callable[[Decoded], float]) -> list[float]:
        return sorted(figure(w) / figure(p) for p, w in zip(self.plain, self.watched, strict=True))


def decode_ratio(cluster: LoopbackCluster, rounds: int) -> DecodeRounds:
    node = cluster.nodes[0]
    assert node.process is not None
    process = psutil.Process(node.process.pid)
    node.post("/place_instance", {"model_id": "exo-tiny", "min_nodes": 1}).raise_for_status()
    wait_until(lambda: any(i["status"] == "ready" for i in node.state()["instances"].values()), 120, "ready")
    decode_rate(node.url)  # warm-up
    plain: list[Decoded] = []
    watched: list[Decoded] = []
    with chromium() as driver:

        def without() -> None:
            driver.get("about:blank")
            plain.append(decode_rate(node.url, process))

        def with_dashboard() -> None:
            driver.get(node.url + "/")
            wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]"), 20, "nodes")
            stop = threading.Event()

            def scrape(stop: threading.Event = stop) -> None:
                while not stop.wait(1.0):
                    httpx.get(node.url + "/metrics", timeout=5).raise_for_status()

            scraper = threading.Thread(target=scrape)
            scraper.start()
            try:
                watched.append(decode_rate(node.url, process))
            finally:
                stop.set()
                scraper.join()

        for round_number in range(rounds):  # ABBA: A B, B A, A B, ...
            for run in (without, with_dashboard) if round_number % 2 == 0 else (with_dashboard, without):
                run()
    return DecodeRounds(plain, watched)


def node_cpu_cost(
    cluster: LoopbackCluster, rounds: int, window_s: float = 10.0
) -> tuple[list[float], list[float]]:
    """CPU ms per second the node process (not its runners) spends, idle, without and with the
    dashboard open and /metrics scraped every second: what the feed and the scrape cost the node,
    a figure a busy shared machine cannot blur the way it blurs tokens/s."""
    node = cluster.nodes[0]
    assert node.process is not None
    process = psutil.Process(node.process.pid)

    def cpu_ms_per_s() -> float:
        before = process.cpu_times()
        time.sleep(window_s)
        after = process.cpu_times()
        return (after.user + after.system - before.user - before.system) * 1000 / window_s

    plain: list[float] = []
    watched: list[float] = []
    with chromium() as driver:
        for _ in range(rounds):
            driver.get("about:blank")
            plain.append(cpu_ms_per_s())
            driver.get(node.url + "/")
            wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#nodes tr[data-node]"), 20, "nodes")
            stop = threading.Event()

            def scrape(stop: threading.Event = stop) -> None:
                while not stop.wait(1.0):
                    httpx.get(node.url + "/metrics", timeout=5).raise_for_status()

            scraper = threading.Thread(target=scrape)
            scraper.start()
            try:
                watched.append(cpu_ms_per_s())
            finally:
                stop.set()
                scraper.join()
    return plain, watched


def main() -> None:
    parser = argparse.ArgumentParser(description="The dashboard's costs, measured in chromium.")
    parser.add_argument("--decode-rounds", type=int, default=ROUNDS_DECODE)
    parser.add_argument("--decode-only", action="store_true", help="only the decode ratio")
    parser.add_argument("--cpu-only", action="store_true", help="only the node's CPU cost of the dashboard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        with LoopbackCluster(Path(root) / "paint", 1) as single:
            single.start_all()
            wait_until(lambda: single.nodes[0].get("/health"), 60, "node")
            if args.cpu_only:
                plain, watched = node_cpu_cost(single, 4)
                print(f"node CPU ms/s idle: neither {[round(v, 1) for v in plain]}")
                print(f"node CPU ms/s idle: dashboard+metrics {[round(v, 1) for v in watched]}")
                return
            if not args.decode_only:
                paints = [first_paint(single.nodes[0].url + "/") for _ in range(ROUNDS_PAINT)]
                fcp = [paint for paint, _ in paints]
                shown = [shown for _, shown in paints]
                print(f"first contentful paint ms: median {statistics.median(fcp):.0f}, {fcp}")
                print(f"cluster shown ms: median {statistics.median(shown):.0f}, max {max(shown):.0f}")
            decoded = decode_ratio(single, args.decode_rounds)
            for name, figure in FIGURES.items():
                for side, runs in (("neither", decoded.plain), ("dashboard+metrics", decoded.watched)):
                    values = [round(figure(d), 3) for d in runs]
                    print(f"{name}, {side}: median {statistics.median(values):.3f} {values}")
                if name == "ms/token outside the pass":  # near zero, noisy: a difference, not a ratio
                    medians = [
                        statistics.median(map(figure, runs)) for runs in (decoded.plain, decoded.watched)
                    ]
                    print(f"{name}, dashboard+metrics - neither: {medians[1] - medians[0]:+.3f} ms")
                    continue
                pairs = decoded.pair_ratios(figure)
                quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
                print(
                    f"{name}, ratio dashboard+metrics / neither: of medians "
                    f"{decoded.ratio_of_medians(figure):.3f}; per round pair median "
                    f"{statistics.median(pairs):.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
                    f"range {pairs[0]:.3f}-{pairs[-1]:.3f}"
                )
        if args.decode_only:
            return
        with LoopbackCluster(Path(root) / "events", 3) as cluster:
            cluster.start_all()
            wait_until(lambda: (state := cluster.converged()) and len(state["nodes"]) == 3, 60, "three nodes")
            latencies = event_latencies(cluster)
            print(
                f"event visible ms: p50 {percentile(latencies, 0.5):.0f}, "
                f"p95 {percentile(latencies, 0.95):.0f}, "
                f"max {max(latencies):.0f} ({[round(v) for v in latencies]})"
            )


if __name__ == "__main__":
    main()
