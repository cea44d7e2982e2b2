"""The width x groups sweep of paper section 3.1 (Figure 6): its grid and its Pareto front."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

SWEEP_WIDTHS = (1, 2, 4, 8)  # paper section 3.1
SWEEP_GROUPS = (1, 2, 4, 8, 16)


def _groups_where_they_divide(groups: int, inputs: Sequence[int], outputs: Sequence[int]) -> tuple[int, ...]:
    return tuple(groups if i % groups == 0 and o % groups == 0 else 1 for i, o in zip(inputs, outputs, strict=True))


def sweep_variants(
    features: Sequence[int],
    channels: int,
    widths: Sequence[int] = SWEEP_WIDTHS,
    nmf_groups: Sequence[int] = SWEEP_GROUPS,
    mix_groups: Sequence[int] = SWEEP_GROUPS,
) -> dict[str, dict[str, Any]]:
    """The paper's section 3.1 grid: width x NMF groups x 1x1 groups, for a network
    with ``features`` outputs per block on images with ``channels`` channels.

    A group count applies to every block whose input and output channel counts
    it divides (blocks whose counts it does not divide, such as the RGB input
    or the 10 classes, keep one group).

    Returns:
      ``{name: {"width": ..., "groups": ..., "mix_groups": ...}}``, fields of ``config.model``.
    """
    variants = {}
    for width, nmf_group, mix_group in itertools.product(widths, nmf_groups, mix_groups):
        outputs = [f * width for f in features[:-1]] + [features[-1]]
        inputs = [channels, *outputs[:-1]]
        variants[f"width{width}_nmf{nmf_group}_mix{mix_group}"] = {
            "width": width,
            "groups": _groups_where_they_divide(nmf_group, inputs, outputs),
            "mix_groups": _groups_where_they_divide(mix_group, outputs, outputs),
        }
    return variants


def pareto_front(parameters: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the runs no smaller run beats or equals in accuracy, by increasing size."""
    front, best = [], -math.inf
    for index in sorted(range(len(parameters)), key=lambda i: (parameters[i], -accuracies[i])):
        if accuracies[index] > best:
            front.append(index)
            best = accuracies[index]
    return front
