"""``python -m partitioner.cli``: the command line."""

from .main import main

main()
