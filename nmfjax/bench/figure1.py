"""The paper's Figure 1: time and memory of the backward pass of the whole CNMF network with the
unrolled, approx and implicit gradients, against the CNN's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nmfjax import evaluation, models, ops
from nmfjax.bench import timing
from nmfjax.bench.throughput import Sizes


def measure_backward(model: str, gradient: str, iterations: int, batch_size: int, repeats: int) -> dict:
    """Forward and forward+backward time and memory of the loss gradient (Figure 1)."""
    spec = models.NetworkSpec(architecture=model, nmf=ops.NMFOptions(iterations=iterations, gradient=gradient))
    graphdef, params, batch_stats = models.split_state(models.Network(spec, rngs=nnx.Rngs(0)))
    images = jax.random.uniform(jax.random.key(0), (batch_size, 28, 28, 3))
    labels = jnp.arange(batch_size) % 10

    def loss(params):
        return evaluation.batch_loss(graphdef, params, batch_stats, images, labels)[0]

    forward, _ = timing.compile_timed(jax.jit(loss), params)
    backward, compile_seconds = timing.compile_timed(jax.jit(jax.grad(loss)), params)
    forward_seconds = timing.median_seconds(forward, params, repeats=repeats)
    gradient_seconds = timing.median_seconds(backward, params, repeats=repeats)
    return {
        "model": model,
        "gradient": gradient if spec.uses_nmf else "autodiff",
        "iterations": iterations,
        "batch_size": batch_size,
        "forward_ms": 1e3 * forward_seconds,
        "forward_backward_ms": 1e3 * gradient_seconds,
        "backward_ms": 1e3 * max(gradient_seconds - forward_seconds, 0.0),
        "backward_temp_memory_mb": backward.memory_analysis().temp_size_in_bytes / 2**20,
        "compile_seconds": compile_seconds,
    }


def _ratio(value: float, reference: float) -> float:
    # The backward time is a difference of two timings: at tiny sizes the CNN's can come out as 0.
    return value / reference if reference > 0 else math.nan


def figure1(sizes: Sizes) -> list[dict]:
    """The paper's Figure 1: backward time and memory of the whole network per backward mode and N."""
    rows = []
    for iterations in sizes.figure1_iterations:
        cnn = measure_backward("cnn", "approx", iterations, sizes.figure1_batch, sizes.repeats)
        rows.append(cnn)
        for gradient in ("unrolled", "approx", "implicit"):
            rows.append(measure_backward("cnmf", gradient, iterations, sizes.figure1_batch, sizes.repeats))
        for row in rows[-4:]:
            row["backward_time_vs_cnn"] = _ratio(row["backward_ms"], cnn["backward_ms"])
            row["backward_memory_vs_cnn"] = _ratio(row["backward_temp_memory_mb"], cnn["backward_temp_memory_mb"])
    return rows


FIGURE1_COLUMNS = [
    ("N", "iterations", "d"),
    ("model", "model", "s"),
    ("backward", "gradient", "s"),
    ("forward ms", "forward_ms", ".1f"),
    ("backward ms", "backward_ms", ".1f"),
    ("backward time vs CNN", "backward_time_vs_cnn", ".2f"),
    ("backward temp MB", "backward_temp_memory_mb", ".1f"),
    ("backward memory vs CNN", "backward_memory_vs_cnn", ".2f"),
]
