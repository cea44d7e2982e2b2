"""Noise robustness: test accuracy when the test images are mixed with uniform noise or lose pixels.

The corruptions of the authors' earlier work (Rotermund et al., 2023), at
levels eta = 0, 0.05, ..., 1: uniform, ``(1 - eta) x / sum(x) + eta n / sum(n)``
with ``n ~ U(0, 1)``; holes, each pixel kept with probability ``1 - eta``, then
the image L1-normalised. Then the usual centre crop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nmfjax import data, ops
from nmfjax.errors import ConfigError
from nmfjax.experiments.common import Trained, evaluator

NOISE_KINDS = ("uniform", "holes")
NOISE_LEVELS = tuple(round(0.05 * step, 2) for step in range(21))  # 0, 0.05, ..., 1.0


def _l1_normalize_images(images: jax.Array) -> jax.Array:
    return ops.l1_normalize(images.reshape(images.shape[0], -1)).reshape(images.shape)


def add_noise(key: jax.Array, images: jax.Array, kind: str, eta: float | jax.Array) -> jax.Array:
    """The test-time corruptions of a batch.

    ``"uniform"``: ``(1 - eta) * x / sum(x) + eta * n / sum(n)``, ``n ~ U(0, 1)``
    per value; ``"holes"``: every pixel (all its channels) kept with probability
    ``1 - eta``, then the image divided by its sum.

    Args:
      key: a ``jax.random.key``.
      images: ``(B, H, W, C)`` float in [0, 1], before the centre crop.
      kind: one of :data:`NOISE_KINDS`.
      eta: noise level in [0, 1].

    Returns:
      ``(B, H, W, C)`` non-negative images, each summing to one (or all zero).
    """
    if kind == "uniform":
        noise = jax.random.uniform(key, images.shape, images.dtype)
        return (1 - eta) * _l1_normalize_images(images) + eta * _l1_normalize_images(noise)
    if kind == "holes":
        keep = jax.random.bernoulli(key, 1 - eta, (*images.shape[:3], 1))
        return _l1_normalize_images(jnp.where(keep, images, 0.0))
    raise ConfigError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}.")


@dataclasses.dataclass(frozen=True)
class Noise:
    """The evaluation hook that applies :func:`add_noise` of ``kind`` at level ``eta`` (a traced
    argument): batch ``i`` gets the noise of ``(seed, i)`` alone, so every network sees the same.
    """

    kind: str
    seed: int = 0

    def __post_init__(self):
        if self.kind not in NOISE_KINDS:
            raise ConfigError(f"noise kind must be one of {NOISE_KINDS}, got {self.kind!r}.")

    def __call__(self, pixels: jax.Array, batch_number: jax.Array, eta: jax.Array) -> jax.Array:
        """``pixels`` with noise of strength ``eta``, a fresh draw per batch."""
        return add_noise(jax.random.fold_in(jax.random.key(self.seed), batch_number), pixels, self.kind, eta)


def noise_robustness(
    runs: Sequence[Trained],
    split: data.Split,
    *,
    kinds: Sequence[str] = NOISE_KINDS,
    levels: Sequence[float] = NOISE_LEVELS,
    seed: int = 0,
) -> dict[str, Any]:
    """Test accuracy of each run at every noise kind and level (the same noise for every run)."""
    results = {}
    progress = tqdm(total=len(runs) * len(kinds) * len(levels), desc="noise", unit="eval")
    for run in runs:
        evaluate = evaluator(run.model, split, batch_size=run.config.eval_batch_size)
        accuracies: dict[str, list[float]] = {}
        for kind in kinds:
            accuracies[kind] = []
            for eta in levels:
                accuracies[kind].append(evaluate(Noise(kind, seed), (np.float32(eta),))["accuracy"])
                progress.update()
        results[run.label] = {
            "workdir": str(run.workdir),
            "model": run.config.model.architecture,
            "epoch": run.epoch,
            **accuracies,
        }
    progress.close()
    return {"kinds": list(kinds), "levels": list(levels), "test_images": len(split), "seed": seed, "runs": results}
