"""`exo models pull|list|rm ID`: models for people at a terminal.

With a node running at `--api-url` (env `EXO_API_URL`, default http://127.0.0.1:52415) the CLI
asks it: the cluster fetches (one download per cluster) and the bar shows the cluster's bytes.
Without one it works on the models dir itself (`--models-dir`, env `EXO_MODELS_DIR`, default
~/.exo/models), fetching from the Hub at `HF_ENDPOINT` with `HF_TOKEN`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_API_URL = "http://127.0.0.1:52415"
POLL_SECONDS = 0.5


class NodeError(Exception):
    """The node answered with an error (its message is shown as is)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="exo models", description="Fetch, list and delete models.")
    parser.add_argument("--api-url", default=os.environ.get("EXO_API_URL") or DEFAULT_API_URL)
    parser.add_argument("--api-key", default=os.environ.get("EXO_API_KEY"), help="the node's --api-key")
    parser.add_argument(
        "--models-dir", type=Path, help="used when no node answers (default: EXO_MODELS_DIR or ~/.exo/models)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    pull = commands.add_parser("pull", help="fetch a Hugging Face model (org/name)")
    pull.add_argument("model_id")
    pull.add_argument("--node", action="append", dest="node_ids", help="fetch to this node (repeatable)")
    commands.add_parser("list", help="the models and their state on each node")
    remove = commands.add_parser("rm", help="delete a model's files (from every node)")
    remove.add_argument("model_id")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    node = _Node(args.api_url, args.api_key)
    try:
        if node.running():
            return _with_node(node, args)
        return _without_node(args)
    except NodeError as error:
        print(f"exo models: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _Node:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key

    def running(self) -> bool:
        try:
            self.call("GET", "/health", timeout=2.0)
        except (NodeError, OSError):
            return False
        return True

    def call(self, method: str, path: str, body: object | None = None, timeout: float = 30.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            try:
                detail = json.loads(error.read())
                message = detail.get("error", {}).get("message") if isinstance(detail, dict) else None
            except (ValueError, AttributeError):
                message = None
            raise NodeError(message or f"{method} {path}: HTTP {error.code}") from None


def _with_node(node: _Node, args: argparse.Namespace) -> int:
    match args.command:
        case "pull":
            body: dict[str, object] = {"model_id": args.model_id}
            if args.node_ids:
                body["node_ids"] = args.node_ids
            accepted = node.call("POST", "/models/download", body)
            return _follow(node, args.model_id.split("@", 1)[0], list(accepted["node_ids"]))
        case "list":
            listing = node.call("GET", "/models")
            for model in listing["data"]:
                states = ", ".join(
                    f"{node_id}: {_state_text(state)}" for node_id, state in sorted(model["nodes"].items())
                )
                print(f"{model['id']:<48} {_size(model['bytes']):>10}  {states}")
            return 0
        case "rm":
            answer = node.call(
                "DELETE", "/models/" + urllib.parse.quote(args.model_id, safe="/@"), timeout=60.0
            )
            print(f"deleted {answer['model_id']} from {', '.join(answer['node_ids'])}")
            return 0
        case _:
            raise AssertionError(args.command)


def _follow(node: _Node, model_id: str, node_ids: list[str]) -> int:
    """A progress bar over the nodes' bytes, until each is ready or failed."""
    from tqdm import tqdm

    with tqdm(unit="B", unit_scale=True, desc=model_id, total=0) as bar:
        while True:
            listing = node.call("GET", "/models")
            nodes = next((model["nodes"] for model in listing["data"] if model["id"] == model_id), {})
            states = [nodes.get(node_id) for node_id in node_ids]
            total = sum(state["bytes_total"] for state in states if state)
            done = sum(state["bytes_done"] for state in states if state)
            if total and bar.total != total:
                bar.total = total
            bar.update(done - bar.n)
            failed = [
                (node_id, state)
                for node_id, state in zip(node_ids, states, strict=True)
                if state and state["status"] == "failed"
            ]
            if failed:
                bar.close()
                for node_id, state in failed:
                    print(f"exo models: {node_id}: {state.get('reason') or 'failed'}", file=sys.stderr)
                return 1
            if all(state and state["status"] == "ready" for state in states):
                bar.update(bar.total - bar.n if bar.total else 0)
                break
            time.sleep(POLL_SECONDS)
    print(f"{model_id} is ready on {', '.join(node_ids)}")
    return 0


def _without_node(args: argparse.Namespace) -> int:
    from exo.inference.downloads import download_files, remove_model
    from exo.inference.hub import HubError, HubSettings, fetch_hub_model
    from exo.inference.manifest import is_complete, needed_files
    from exo.inference.models import list_models, split_hub_id

    models_dir: Path = args.models_dir or Path(
        os.environ.get("EXO_MODELS_DIR")
        or Path(os.environ.get("EXO_HOME") or Path.home() / ".exo") / "models"
    )
    match args.command:
        case "pull":
            hub = split_hub_id(args.model_id)
            if hub is None:
                raise NodeError(f"{args.model_id!r} is not a Hugging Face repo id (org/name[@revision])")
            settings = HubSettings.from_environment()
            from tqdm import tqdm

            try:
                model = fetch_hub_model(
                    hub[0], hub[1], settings, models_dir / ".downloads" / hub[0] / ".meta"
                )
                files = needed_files(model)
                with tqdm(
                    unit="B", unit_scale=True, desc=hub[0], total=sum(each.size for each in files)
                ) as bar:
                    done: dict[str, int] = {}

                    def progress(path: str, count: int, _total: int) -> None:
                        bar.update(count - done.get(path, 0))
                        done[path] = count

                    download_files(models_dir, model, files, settings, progress=progress)
            except HubError as error:
                raise NodeError(error.message) from None
            print(f"{hub[0]} is in {models_dir}")
            return 0
        case "list":
            for model in list_models(models_dir):
                state = "ready" if is_complete(Path(model.path)) else "partial"
                if not model.supported:
                    state = f"unsupported: {model.reason}"
                print(f"{model.model_id:<48} {_size(model.total_weight_bytes):>10}  {state}")
            return 0
        case "rm":
            if not remove_model(models_dir, args.model_id.split("@", 1)[0]):
                raise NodeError(f"no model {args.model_id!r} in {models_dir}")
            print(f"deleted {args.model_id} from {models_dir}")
            return 0
        case _:
            raise AssertionError(args.command)


def _state_text(state: dict[str, Any]) -> str:
    status = str(state["status"])
    if status == "downloading":
        return f"downloading {_size(int(state['bytes_done']))}/{_size(int(state['bytes_total']))}"
    if status == "failed":
        return f"failed ({state.get('reason')})"
    return status


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"
