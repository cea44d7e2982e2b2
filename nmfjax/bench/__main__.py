"""``python -m nmfjax.bench``."""

from nmfjax.bench.cli import main

main()
