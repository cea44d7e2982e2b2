"""Timing and XLA's cost and memory analyses of compiled programs, for the benchmark."""

from __future__ import annotations

import statistics
import time

import jax

from nmfjax import models


def median_seconds(function, *args, repeats: int) -> float:
    """The median over ``repeats`` timed calls of ``function(*args)``, after one warm-up call."""
    jax.block_until_ready(function(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compile_timed(jitted, *args):
    """``jitted`` lowered and compiled for ``args``, and the seconds it took."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def flops(compiled) -> float:
    """The FLOPs of a compiled program by XLA's cost analysis (of one device's share)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def nmf_layer_problems(spec: models.NetworkSpec, batch_size: int) -> list[tuple[int, int, int]]:
    """``(positions, S, I)`` of each NMF layer's op call at ``batch_size`` (every group's positions)."""
    size, _, channels = spec.input_shape
    problems = []
    for index, kernel_size in enumerate(spec.kernel_sizes):
        kernel_size = kernel_size or size
        out = size - kernel_size + 1
        features, groups = spec.block_features[index], spec.groups[index]
        inputs, hidden = kernel_size * kernel_size * channels // groups, features // groups
        problems.append((batch_size * out * out * groups, inputs, hidden))
        size, channels = (out // 2 if spec.pooling[index] else out), features
    return problems


def nmf_iteration_flops(positions: int, inputs: int, hidden: int) -> int:
    """FLOPs of one NMF update: per position two ``S x I`` products (``4 S I``), the division and the
    update (``~2 S + 4 I``).
    """
    return positions * (4 * inputs * hidden + 2 * inputs + 4 * hidden)


def uncounted_loop_flops(spec: models.NetworkSpec, batch_size: int) -> float:
    """FLOPs of the forward NMF iterations that XLA's cost analysis leaves out.

    XLA counts the body of a while loop once, whatever its trip count; the
    forward pass runs it ``N`` times per NMF layer (:func:`nmf_iteration_flops`).
    An unrolled loop (``NMFOptions.unroll``) is counted whole.
    """
    if not spec.uses_nmf or spec.nmf.unroll:
        return 0.0
    return float(
        sum(
            (spec.nmf.iterations - 1) * nmf_iteration_flops(*problem)
            for problem in nmf_layer_problems(spec, batch_size)
        )
    )


def peak_bytes(compiled) -> int:
    """Arguments, outputs and temporaries of a compiled program, less what they alias."""
    memory = compiled.memory_analysis()
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
