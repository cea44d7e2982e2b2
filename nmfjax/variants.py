"""Short trainings of config variants, one workdir each under a root: what the training commands
of ``python -m nmfjax.experiments`` (``train-iterations``, ``train-gradients``, ``sweep``) run.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections

from nmfjax import configuration, training, workdirs


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
