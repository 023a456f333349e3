"""The composition root: wires the adapters to the roles and runs a node (`exo`, `python -m exo.node`)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """The `exo` console script; imports the node's components only when a node is started."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["cluster"]:
        from exo.node.cluster_cli import main as cluster

        raise SystemExit(cluster(args[1:]))
    from exo.node.main import main as run

    run(argv)
