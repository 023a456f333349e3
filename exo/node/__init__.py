"""The composition root: wires the adapters to the roles and runs a node (`exo`, `python -m exo.node`)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """The `exo` console script; imports the node's components only when a node is started."""
    from exo.node.main import main as run

    run(argv)
