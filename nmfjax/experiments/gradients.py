"""The gradient study: how close the approx and implicit weight gradients come to the exact
("unrolled") one, per NMF layer, as the number of iterations grows (paper section 2.3, eq. 17-19).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nmfjax import evaluation, models
from nmfjax.errors import ConfigError
from nmfjax.experiments.common import with_nmf_options

GRADIENT_MODES = ("approx", "implicit", "unrolled")


def _layer_name(path) -> str:
    names = [str(getattr(entry, "key", getattr(entry, "idx", entry))) for entry in path]
    return f"block {int(names[1]) + 1}" if names[:1] == ["blocks"] else "/".join(names)


@functools.partial(jax.jit, static_argnames="graphdef")
def _loss_gradient(params, rest, images, labels, *, graphdef):
    return jax.grad(lambda params: evaluation.batch_loss(graphdef, params, rest, images, labels)[0])(params)


def module_a_gradients(model: models.Network, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Gradient of the mean training loss (training mode) for each block's module-a kernel.

    Args:
      model: the network.
      images: ``(B, H, W, C)`` inputs in [0, 1].
      labels: ``(B,)`` classes.

    Returns:
      ``{"block 1": gradient, ...}``, each of its kernel's shape.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    gradients = _loss_gradient(params, rest, images, labels, graphdef=graphdef)
    is_variable = lambda value: isinstance(value, nnx.Variable)  # noqa: E731
    return {
        _layer_name(path): variable[...]
        for path, variable in jax.tree_util.tree_flatten_with_path(gradients, is_leaf=is_variable)[0]
        if models.parameter_group(variable) == "module_a"
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def _backprop_gradients(model, images, labels, iterations: int, gradient: str) -> dict[str, np.ndarray]:
    network = with_nmf_options(model, iterations=iterations, gradient=gradient, learning="backprop")
    return jax.device_get(module_a_gradients(network, images, labels))


def gradient_study(
    model: models.Network,
    images: jax.Array | np.ndarray,
    labels: jax.Array | np.ndarray,
    values: Sequence[int],
    modes: Sequence[str] = ("approx", "implicit"),
) -> dict[str, Any]:
    """Per NMF layer: cosine similarity and norm ratio of each mode's weight gradient
    against the ``"unrolled"`` (exact autodiff) gradient, at each number of iterations.

    The same weights, images and labels for every mode; NMF layers learn by
    backprop here whatever the model was trained with.
    """
    if not model.spec.uses_nmf:
        raise ConfigError(f"the gradient study needs an NMF network (cnmf, cnmf_1x1), got {model.spec.architecture!r}.")
    rows = []
    for iterations in tqdm(values, desc="gradients", unit="N"):
        exact = _backprop_gradients(model, images, labels, iterations, "unrolled")
        for mode in modes:
            for layer, gradient in _backprop_gradients(model, images, labels, iterations, mode).items():
                rows.append(
                    {
                        "iterations": iterations,
                        "mode": mode,
                        "layer": layer,
                        "cosine": _cosine(gradient, exact[layer]),
                        "norm_ratio": float(np.linalg.norm(gradient) / (np.linalg.norm(exact[layer]) + 1e-300)),
                    }
                )
    return {"images": int(images.shape[0]), "rows": rows}
