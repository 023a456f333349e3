"""`python -m exo.node`."""

from exo.node import main

main()
