"""Pictures of what the first NMF layer learned: its weights, the images it rebuilds, and how sparse ``h`` is."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nmfjax import models
from nmfjax.errors import ConfigError
from nmfjax.experiments.common import in_evaluation_mode
from nmfjax.layers import NMFConv


def first_layer_filters(model: models.Network) -> np.ndarray:
    """The first block's module-a weights as ``(units, kh, kw, C)`` pictures in [0, 1].

    NMF: each unit's column of ``W`` (non-negative, summing to one) scaled to its
    maximum; CNN: each filter min-max scaled.
    """
    layer: Any = model.blocks[0].module_a  # NMFConv or PatchConv
    if layer.feature_group_count != 1:
        raise ConfigError(
            f"the first layer has feature_group_count={layer.feature_group_count}: "
            "its weights are pictures only with one group."
        )
    if isinstance(layer, NMFConv):
        weights = np.asarray(layer.nmf_weights()[0]).T  # (I, S)
        pictures = weights / weights.max(axis=1, keepdims=True)
    else:
        weights = np.asarray(layer.kernel[...]).reshape(-1, layer.out_features).T
        low, high = weights.min(axis=1, keepdims=True), weights.max(axis=1, keepdims=True)
        pictures = (weights - low) / np.maximum(high - low, 1e-12)
    return pictures.reshape(-1, *layer.kernel_size, layer.in_features)


def first_layer_reconstructions(model: models.Network, images: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Images rebuilt from the first NMF layer's ``h`` (:meth:`NMFConv.reconstruct`) and the
    relative L1 error of each, over the pixels the layer's patches cover.
    """
    layer = model.blocks[0].module_a
    if not isinstance(layer, NMFConv):
        raise ConfigError(f"reconstructions need an NMF first layer; {model.spec.architecture!r} has a convolution.")
    reconstructed = jax.jit(lambda x: layer.reconstruct(nnx.relu(x)))(images)
    errors = jnp.sum(jnp.abs(reconstructed - images), axis=(1, 2, 3)) / jnp.sum(images, axis=(1, 2, 3))
    return np.asarray(reconstructed), np.asarray(errors)


def hoyer_sparsity(h: jax.Array) -> jax.Array:
    """Hoyer's sparsity over the last axis: 0 for a uniform vector, 1 for a one-hot one."""
    n = h.shape[-1]
    ratio = jnp.sum(jnp.abs(h), -1) / (jnp.linalg.norm(h, axis=-1) + 1e-30)
    return (math.sqrt(n) - ratio) / (math.sqrt(n) - 1)


def nmf_activation_sparsity(model: models.Network, images: jax.Array) -> dict[str, np.ndarray]:
    """Hoyer sparsity of ``h`` at every position of every NMF layer (evaluation mode)."""
    model = in_evaluation_mode(model)
    _, intermediates = nnx.capture(model.logits, nnx.Intermediate, method_outputs=nnx.Intermediate)(images)
    sparsity = {}
    for index, block in enumerate(model.blocks):
        if isinstance(block.module_a, NMFConv) and block.module_a.out_features > 1:
            (h,) = intermediates["blocks"][index]["module_a"]["__call__"]
            sparsity[f"block {index + 1}"] = np.asarray(hoyer_sparsity(h)).ravel()
    if not sparsity:
        raise ConfigError(f"{model.spec.architecture!r} has no NMF layer: use cnmf or cnmf_1x1 workdirs.")
    return sparsity
