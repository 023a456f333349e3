"""`exo status`: the cluster in a terminal (rich), refreshing; `--once` prints one frame and exits.

It asks the node at `--api-url` (env `EXO_API_URL`, default http://127.0.0.1:52415) for `/state`,
`/node_status` and `/models`, the same documents the dashboard reads; download progress shows
when the node reports it. Exit status: 0, or 1 with the reason when the node cannot be read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

DEFAULT_API_URL = "http://127.0.0.1:52415"


class NodeUnreachable(Exception):
    """The node did not answer, or refused (its message is shown as is)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="exo status", description="The cluster at a glance.")
    parser.add_argument("--api-url", default=os.environ.get("EXO_API_URL") or DEFAULT_API_URL)
    parser.add_argument("--api-key", default=os.environ.get("EXO_API_KEY"), help="the node's --api-key")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    args = parser.parse_args(argv)
    if not args.interval > 0:
        parser.error("--interval must be positive")
    return args


def fetch(client: httpx.Client, path: str, *, optional: bool = False) -> Any:
    try:
        response = client.get(path)
    except httpx.HTTPError as error:
        raise NodeUnreachable(f"no node at {client.base_url}: {error}") from None
    if response.status_code == 401:
        raise NodeUnreachable("the node wants an API key: pass --api-key or set EXO_API_KEY")
    if response.status_code >= 400:
        if optional:
            return None
        raise NodeUnreachable(f"{path}: {response.status_code} {response.text[:200]}")
    return response.json()


def snapshot(client: httpx.Client) -> dict[str, Any]:
    return {
        "state": fetch(client, "/state"),
        "status": fetch(client, "/node_status"),
        "models": fetch(client, "/models", optional=True) or {"data": []},
    }


def gib(value: object) -> str:
    return f"{value / 2**30:.1f} GiB" if isinstance(value, int | float) else "?"


def render(view: dict[str, Any]) -> Group:
    """One frame: the header, nodes, instances and (when any) downloads."""
    state, status = view["state"], view["status"]
    links: dict[str, Any] = status.get("links") or {}
    header = Text.assemble(
        ("exo ", "bold"),
        f"at {status.get('node_id', '?')} · master {state.get('master_node_id') or 'none'} · term "
        f"{state.get('term', 0)} · index {state.get('last_event_index', 0)}",
    )
    nodes = Table(title="nodes", title_justify="left", expand=True)
    for column in ("node", "status", "memory used / total", "link"):
        nodes.add_column(column)
    for node_id, node in sorted(state.get("nodes", {}).items()):
        used = node.get("memory_total_bytes", 0) - node.get("memory_available_bytes", 0)
        link = links.get(node_id) or {}
        rtt = link.get("rtt_ms")
        nodes.add_row(
            node_id + (" ★" if node_id == state.get("master_node_id") else ""),
            Text(node.get("status", "?"), style="green" if node.get("status") == "alive" else "red"),
            f"{gib(used)} / {gib(node.get('memory_total_bytes'))}",
            "this node"
            if node_id == status.get("node_id")
            else (f"{rtt:.2f} ms" if rtt is not None else "—"),
        )
    instances = Table(title="instances", title_justify="left", expand=True)
    for column in ("instance", "model", "status", "layers per node"):
        instances.add_column(column)
    for instance_id, instance in sorted(state.get("instances", {}).items()):
        stages = sorted(
            instance.get("shard_assignments", {}).items(), key=lambda item: item[1].get("start_layer", 0)
        )
        split = "  ".join(
            f"{node} {shard['start_layer']}-{shard['end_layer']}"
            if "start_layer" in shard
            else f"{node} rank {shard.get('rank')}"
            for node, shard in stages
        )
        style = {"ready": "green", "failed": "red"}.get(instance.get("status", ""), "yellow")
        instances.add_row(
            instance_id, instance.get("model_id", "?"), Text(instance.get("status", "?"), style=style), split
        )
    parts: list[Any] = [header, nodes, instances]
    downloads = [
        (model["id"], node, figures)
        for model in view["models"].get("data", [])
        for node, figures in (model.get("nodes") or {}).items()
        if figures.get("status") == "downloading"
    ]
    if downloads:
        table = Table(title="downloads", title_justify="left", expand=True)
        for column in ("model", "node", "progress"):
            table.add_column(column)
        for model_id, node, figures in downloads:
            done, total = figures.get("bytes_done", 0), figures.get("bytes_total", 0)
            table.add_row(
                model_id,
                node,
                f"{gib(done)} / {gib(total)}" + (f" ({100 * done / total:.0f}%)" if total else ""),
            )
        parts.append(table)
    return Group(*parts)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    console = Console()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.api_url.rstrip("/"), headers=headers, timeout=5.0) as client:
        try:
            if args.once:
                console.print(render(snapshot(client)))
                return 0
            with Live(render(snapshot(client)), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(args.interval)
                    live.update(render(snapshot(client)), refresh=True)
        except NodeUnreachable as error:
            print(f"exo status: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
