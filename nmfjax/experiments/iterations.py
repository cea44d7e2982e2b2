"""A trained network evaluated with other numbers of NMF iterations (the paper's open question 3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from nmfjax import data
from nmfjax.experiments.common import Trained, evaluator, with_nmf_options


def iterations_at_evaluation(run: Trained, split: data.Split, values: Sequence[int]) -> dict[str, Any]:
    """Test accuracy of a trained network evaluated with ``N`` NMF iterations, for each ``N``."""
    accuracies = []
    for iterations in tqdm(values, desc="iterations", unit="N"):
        model = with_nmf_options(run.model, iterations=iterations)
        accuracies.append(evaluator(model, split, batch_size=run.config.eval_batch_size)()["accuracy"])
    return {
        "workdir": str(run.workdir),
        "model": run.config.model.architecture,
        "epoch": run.epoch,
        "trained_iterations": run.model.spec.nmf.iterations,
        "test_images": len(split),
        "iterations": list(values),
        "accuracy": accuracies,
    }
