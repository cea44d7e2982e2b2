"""Short trainings of config variants, and the width x groups sweep of paper section 3.1 (Figure 6)."""

from __future__ import annotations

import itertools
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from nmfjax import configuration, training, workdirs

SWEEP_WIDTHS = (1, 2, 4, 8)  # paper section 3.1
SWEEP_GROUPS = (1, 2, 4, 8, 16)


def train_variants(
    config: ml_collections.ConfigDict,
    variants: dict[str, dict[str, Any]],
    root: str | pathlib.Path,
    *,
    start_over: bool = False,
) -> dict[str, pathlib.Path]:
    """Trains ``config`` with each variant's overrides into ``root/<name>``.

    Variants whose workdir already holds ``num_epochs`` epochs are skipped;
    unfinished ones resume from their latest checkpoint. With ``start_over``,
    every variant's previous run is moved aside and trained again.

    Args:
      config: the config every variant starts from.
      variants: ``{name: {"model.width": 2, ...}}``, dotted fields to change.
      root: the parent of the variants' workdirs.
      start_over: train finished variants again too.

    Returns:
      ``{name: workdir}``.
    """
    root = pathlib.Path(root)
    directories = {}
    for position, (name, overrides) in enumerate(variants.items(), 1):
        variant = configuration.apply_overrides(config, overrides)
        workdir = directories[name] = root / name
        done = len(workdirs.read_metrics(workdir))
        if done >= variant.num_epochs and not start_over:
            print(f"[{position}/{len(variants)}] {name}: finished ({done} epochs), skipped.")
            continue
        print(f"[{position}/{len(variants)}] {name}: training {overrides}", flush=True)
        training.train_and_evaluate(variant, workdir, start_over=start_over)
    return directories


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
