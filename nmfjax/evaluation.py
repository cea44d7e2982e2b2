"""The loss, the metrics and the evaluation loop: the one path that training, the
benchmark and the experiments share.

* :func:`batch_loss`: a batch's mean loss (paper eq. 21) under given parameters.
* :func:`summed_metrics` and :func:`add_metrics`: per-batch sums (loss, correct,
  count) added up inside the jitted steps, from :func:`no_metrics`, divided
  once by :func:`mean_metrics`.
* :class:`Evaluator`: test loss and accuracy over a dataset resident on the
  devices, with an optional preprocessing hook (the noise analysis uses it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nmfjax import data, parallel

_CE_WEIGHT, _MSE_WEIGHT = 1.0, 0.5


def composite_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The paper's loss per example (eq. 21, alpha = 0.5), scaled by 1/1.5 as in the authors' code:
    ``(CE(y, p) + 0.5 * sum_c (p_c - y_c)^2) / 1.5`` with ``p = softmax(logits)``.

    Args:
      logits: ``(B, classes)``.
      labels: ``(B,)`` integer classes.

    Returns:
      ``(B,)`` losses.
    """
    log_probabilities = jax.nn.log_softmax(logits)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    cross_entropy = -jnp.sum(targets * log_probabilities, axis=-1)
    squared_error = jnp.sum((jnp.exp(log_probabilities) - targets) ** 2, axis=-1)
    return (_CE_WEIGHT * cross_entropy + _MSE_WEIGHT * squared_error) / (_CE_WEIGHT + _MSE_WEIGHT)


def batch_loss(
    graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State, images: jax.Array, labels: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, nnx.State]]:
    """The mean :func:`composite_loss` of a batch, differentiable in ``params``.

    Args:
      graphdef: the network's graph (training or evaluation mode).
      params: its ``nnx.Param`` state.
      batch_stats: the rest of its state (BatchNorm statistics).
      images: ``(B, H, W, C)`` float inputs in [0, 1].
      labels: ``(B,)`` integer classes.

    Returns:
      ``(loss, (logits, batch_stats))``: the mean loss, the ``(B, classes)``
      logits, and the BatchNorm statistics after the batch.
    """
    # Fresh variables of this trace, which BatchNorm may update.
    model = nnx.merge(graphdef, params, jax.tree.map(jnp.asarray, batch_stats))
    logits = model.logits(images)
    return jnp.mean(composite_loss(logits, labels)), (logits, nnx.state(model, nnx.BatchStat))


# Per-batch sums (loss, correct, count), as the steps carry them.
Metrics = dict[str, jax.Array]


def summed_metrics(logits: jax.Array, labels: jax.Array, loss: jax.Array | None = None) -> Metrics:
    """A batch's summed loss, correct predictions and example count (add batches, then divide).

    Args:
      logits: ``(B, classes)``.
      labels: ``(B,)``.
      loss: the batch's mean loss when it is already computed (the train step
        has it), else it is computed here.
    """
    count = labels.shape[0]
    return {
        "loss": jnp.sum(composite_loss(logits, labels)) if loss is None else loss * count,
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
        "count": jnp.int32(count),
    }


def add_metrics(totals: Metrics, metrics: Metrics) -> Metrics:
    """Running sums of :func:`summed_metrics` (start from :func:`no_metrics`)."""
    return jax.tree.map(jnp.add, totals, metrics)


def no_metrics(mesh: jax.sharding.Mesh) -> Metrics:
    """The sums before the first batch, replicated over ``mesh`` as the steps return them."""
    zeros = {"loss": np.float32(0), "correct": np.int32(0), "count": np.int32(0)}
    return jax.device_put(zeros, parallel.replicated(mesh))


def mean_metrics(totals: dict[str, Any]) -> dict[str, float]:
    """Mean loss and accuracy of summed metrics (fetched from the device)."""
    totals = jax.device_get(totals)
    return {
        "loss": float(totals["loss"] / totals["count"]),
        "loss_sum": float(totals["loss"]),
        "accuracy": float(totals["correct"] / totals["count"]),
        "count": int(totals["count"]),
    }


# (pixels in [0, 1] of shape (B, H, W, C), batch number, *arguments) -> pixels; hashable (a jit static argument).
Preprocess = Callable[..., jax.Array]


class Evaluator:
    """Test loss and accuracy of a network over a dataset resident on the devices.

    Every batch: uint8 pixels scaled to [0, 1], then ``preprocess`` if given
    (for example noise), the centre crop of training, the network in the mode
    of ``graphdef``, :func:`summed_metrics`. Batches follow the dataset's order
    (with the authors' batch statistics in BatchNorm the batch size matters).

    Args:
      graphdef: the network's graph, normally in evaluation mode.
      crop_size: side of the centre crop.
      batch_size: images per batch (the last batch may be smaller).
      mesh: the batch is split over it (see :mod:`nmfjax.parallel`).
    """

    def __init__(self, graphdef: nnx.GraphDef, crop_size: int, batch_size: int, mesh: jax.sharding.Mesh):
        self.graphdef, self.crop_size, self.batch_size, self.mesh = graphdef, crop_size, batch_size, mesh
        self.step = jax.jit(self._step, static_argnames="preprocess")
        self.one_program_at_a_time = parallel.one_program_at_a_time(mesh)
        self._compiled: dict[tuple, Any] = {}  # compile()'s steps, by (images' shape, batch size)

    def compile(self, params: nnx.State, batch_stats: nnx.State, images: jax.Array, labels: jax.Array) -> None:
        """Compiles the step for whole batches of ``images`` ahead of time; :meth:`evaluate` then runs it
        (without ``preprocess``), so that a program the persistent cache does not keep compiles once.
        """
        batch = jax.ShapeDtypeStruct((self.batch_size,), jnp.int32)
        lowered = self.step.lower(params, batch_stats, images, labels, batch, no_metrics(self.mesh), np.int32(0))
        self._compiled[images.shape, self.batch_size] = lowered.compile()

    def _step(
        self,
        params,
        batch_stats,
        images,
        labels,
        batch_indices,
        totals,
        batch_number=0,
        arguments=(),
        *,
        preprocess=None,
    ):
        """One batch's metrics added to ``totals`` (summed in the step: no extra dispatch per batch)."""
        batch_indices = parallel.split_batch(batch_indices, self.mesh)
        pixels = data.to_float(images[batch_indices])
        if preprocess is not None:
            pixels = preprocess(pixels, batch_number, *arguments)
        model = nnx.merge(self.graphdef, params, batch_stats)
        metrics = summed_metrics(model.logits(data.center_crop(pixels, self.crop_size)), labels[batch_indices])
        return add_metrics(totals, metrics)

    def evaluate(
        self,
        params: nnx.State,
        batch_stats: nnx.State,
        images: jax.Array,
        labels: jax.Array,
        *,
        preprocess: Preprocess | None = None,
        arguments: tuple = (),
        check_stop: Callable[[], None] = lambda: None,
    ) -> dict[str, float]:
        """Mean loss and accuracy over all ``images`` (``(N, H, W, C)`` uint8 on the devices).

        Args:
          params: the network's parameters.
          batch_stats: its BatchNorm statistics.
          images: the dataset's images, e.g. from :func:`nmfjax.parallel.put_replicated`.
          labels: ``(N,)`` int32 class indices.
          preprocess: ``preprocess(pixels, batch_number, *arguments)``, applied
            before the crop; must be hashable (one compilation per value).
          arguments: traced arguments of ``preprocess`` (one compilation for all values).
          check_stop: runs after each batch and may raise to end the evaluation.

        Returns:
          ``loss``, ``loss_sum``, ``accuracy``, ``count``, ``seconds`` and ``images_per_second``.
        """
        num_examples = labels.shape[0]
        indices = np.arange(num_examples, dtype=np.int32)
        start, totals = time.perf_counter(), no_metrics(self.mesh)
        for batch_number, first in enumerate(range(0, num_examples, self.batch_size)):
            batch = indices[first : first + self.batch_size]
            compiled = self._compiled.get((images.shape, len(batch))) if preprocess is None and not arguments else None
            if compiled is not None:
                totals = compiled(params, batch_stats, images, labels, batch, totals, np.int32(batch_number))
            else:
                totals = self.step(
                    params,
                    batch_stats,
                    images,
                    labels,
                    batch,
                    totals,
                    np.int32(batch_number),
                    arguments,
                    preprocess=preprocess,
                )
            if self.one_program_at_a_time:
                jax.block_until_ready(totals)
            check_stop()
        means = mean_metrics(totals)
        seconds = time.perf_counter() - start
        return {**means, "seconds": seconds, "images_per_second": means["count"] / seconds}
