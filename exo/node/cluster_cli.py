"""`exo cluster remove NODE`: ask a running node's API to remove a member that is gone for good.

A two-node cluster that lost one node has no majority, so it makes no cluster changes (serving goes
on); removing the dead member gives the survivor its majority back. The master refuses while the
node still answers. Plain urllib: the command needs nothing the node does not already have.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="exo cluster", description="Cluster membership.")
    commands = parser.add_subparsers(dest="command", required=True)
    remove = commands.add_parser("remove", help="remove a member that is gone for good")
    remove.add_argument("node_id", help="the node to remove (see GET /state's nodes)")
    remove.add_argument(
        "--api-url",
        "--api",
        dest="api",
        default=os.environ.get("EXO_API_URL") or "http://127.0.0.1:52415",
        help="a running node's API URL (env EXO_API_URL), as `exo models` and `exo status` take it",
    )
    remove.add_argument("--api-key", default=os.environ.get("EXO_API_KEY"), help="env EXO_API_KEY")
    args = parser.parse_args(argv)
    url = f"{args.api.rstrip('/')}/node/{urllib.parse.quote(args.node_id, safe='')}"
    request = urllib.request.Request(url, method="DELETE")
    if args.api_key:
        request.add_header("Authorization", f"Bearer {args.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    except urllib.error.HTTPError as error:
        print(f"exo cluster remove: {_message(error.read())} (HTTP {error.code})", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as error:
        print(f"exo cluster remove: cannot reach {args.api}: {error}", file=sys.stderr)
        return 1
    print(f"removed {args.node_id}")
    return 0


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]
