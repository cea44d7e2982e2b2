"""``python -m nmfjax.experiments``: see :mod:`nmfjax.experiments`."""

from nmfjax.experiments.cli import main

main()
