"""`python -m exo.node`."""

from exo.node.main import main

main()
