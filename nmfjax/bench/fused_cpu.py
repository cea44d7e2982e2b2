"""The fused C++ kernel against XLA's loop on a CPU (``--cpu_kernel``): each NMF layer of CNMF+1x1 alone,
and CNMF+1x1's steps and ``train.py``'s epoch path with each, as fractions of the measured float32 peak.

The layers are timed on one device with the positions one device gets at the loop's batch size
(``train.py`` splits a batch over one device per core); the steps and epochs in rounds, the two
kernels in turn within each (:func:`nmfjax.bench.loop.compare_in_rounds`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from nmfjax import cpu_kernel, ops, parallel
from nmfjax.bench import timing
from nmfjax.bench.loop import compare_in_rounds, measure_loop
from nmfjax.bench.peak import PEAK_SIZE, cpu_name, measure_peak_gflops
from nmfjax.bench.throughput import Sizes, measure_train_and_eval, synthetic_train_step
from nmfjax.errors import ConfigError
from nmfjax.outputs import write_output
from nmfjax.tables import markdown_table

MODEL = "cnmf_1x1"
#: The two ways a CPU runs the NMF iterations, XLA's loop and the C++ kernel (``kernel="auto"`` on a CPU).
KERNELS = ("xla", "cpu")


def measure_layers(batch_size: int, devices: int, iterations: int, repeats: int) -> list[dict]:
    """The op's forward ``h`` alone for each NMF layer of CNMF+1x1, with each kernel: one device's share
    of the positions of a batch of ``batch_size`` split over ``devices`` devices.
    """
    _, spec, _ = synthetic_train_step(MODEL, batch_size, iterations, 1)
    rows = []
    for layer, (positions, features, hidden) in enumerate(timing.nmf_layer_problems(spec, batch_size), start=1):
        share = positions // devices
        x = ops.l1_normalize(jax.random.uniform(jax.random.key(layer), (share, features)))
        w = ops.positive_weights(jax.random.uniform(jax.random.key(layer + 100), (features, hidden)))
        x, w = jax.device_put((x, w), jax.devices()[0])
        flops = iterations * timing.nmf_iteration_flops(share, features, hidden)
        row: dict[str, Any] = {"layer": layer, "positions": share, "features": features, "hidden": hidden}
        for kernel in KERNELS:
            forward = jax.jit(lambda x, w, kernel=kernel: ops.nmf(x, w, iterations=iterations, kernel=kernel))
            seconds = timing.median_seconds(forward, x, w, repeats=repeats)
            row[f"{kernel}_ms"] = 1e3 * seconds
            row[f"{kernel}_gflop_per_second"] = flops / seconds / 1e9
        row["speedup"] = row["xla_ms"] / row["cpu_ms"]
        xla = ops.nmf(x, w, iterations=iterations)
        fused = ops.nmf(x, w, iterations=iterations, kernel="cpu")
        row["max_relative_difference"] = float(jnp.max(jnp.abs(fused - xla)) / jnp.max(jnp.abs(xla)))
        rows.append(row)
    return rows


def cpu_kernel_study(sizes: Sizes, output: pathlib.Path, rounds: int = 4, iterations: int = 20) -> dict[str, Any]:
    """``--cpu_kernel``: prints and writes ``cpu_kernel.json``.

    Raises:
      ConfigError: not on a CPU, or the kernel cannot be built here (the reason).
    """
    if jax.default_backend() != "cpu":
        raise ConfigError(
            f"--cpu_kernel compares the CPU's two paths; this machine computes on {jax.default_backend()}"
        )
    if not cpu_kernel.available():
        raise ConfigError(f"the CPU kernel cannot be built here: {cpu_kernel.unavailable_reason()}")
    devices = jax.devices()[: parallel.largest_dividing_count(jax.device_count(), (sizes.loop_batch,))]
    peak = measure_peak_gflops(devices, repeats=sizes.repeats)
    layers = measure_layers(sizes.loop_batch, len(devices), iterations, sizes.repeats)

    def measure(kernel: str) -> dict:
        step = measure_train_and_eval(
            MODEL, sizes.loop_batch, sizes.repeats, peak, iterations, devices=len(devices), kernel=kernel
        )
        loop = measure_loop(MODEL, sizes.loop_batch, peak, sizes.loop_steps, sizes.repeats, iterations, kernel=kernel)
        return {**step, **{key: value for key, value in loop.items() if key.startswith("loop_")}}

    rows, measured = compare_in_rounds(KERNELS, measure, rounds, dict.fromkeys(KERNELS, peak))
    results: dict[str, Any] = {
        "cpu": cpu_name(),
        "jax": jax.__version__,
        "devices": len(devices),
        "vector_bits": cpu_kernel.vector_bits(),  # the kernel's build: 512 (AVX-512) or 256 (AVX2)
        "batch_size": sizes.loop_batch,
        "iterations": iterations,
        "rounds": rounds,
        "peak_size": PEAK_SIZE,
        "peak_gflops": peak,
        "layers": layers,
        "rows": rows,
        "measured": measured,
    }
    print(
        f"{results['cpu']}, {len(devices)} device(s): float32 peak {peak:.0f} GFLOP/s ({PEAK_SIZE}x{PEAK_SIZE})\n"
        + markdown_table(layers, LAYER_COLUMNS)
        + "\n\n"
        + markdown_table(rows, CPU_KERNEL_COLUMNS)
    )
    write_output(output / "cpu_kernel.json", json.dumps(results, indent=2))
    print(f"wrote {output / 'cpu_kernel.json'}")
    return results


LAYER_COLUMNS = [
    ("layer", "layer", "d"),
    ("positions", "positions", "d"),
    ("S", "features", "d"),
    ("I", "hidden", "d"),
    ("XLA ms", "xla_ms", ".1f"),
    ("kernel ms", "cpu_ms", ".1f"),
    ("XLA GFLOP/s", "xla_gflop_per_second", ".0f"),
    ("kernel GFLOP/s", "cpu_gflop_per_second", ".0f"),
    ("kernel x XLA", "speedup", ".2f"),
    ("h: max difference / max", "max_relative_difference", ".1e"),
]
CPU_KERNEL_COLUMNS = [
    ("kernel", "variant", "s"),
    ("train img/s", "train_images_per_second", ".0f"),
    ("train % peak", "train_fraction_of_peak", ".1%"),
    ("eval img/s", "eval_images_per_second", ".0f"),
    ("eval % peak", "eval_fraction_of_peak", ".1%"),
    ("train x XLA", "train_speedup", ".2f"),
    ("eval x XLA", "eval_speedup", ".2f"),
    ("train.py train img/s", "loop_train_images_per_second", ".0f"),
    ("train.py train % peak", "loop_train_fraction_of_peak", ".1%"),
    ("train.py eval img/s", "loop_eval_images_per_second", ".0f"),
    ("train.py eval % peak", "loop_eval_fraction_of_peak", ".1%"),
    ("train.py train x XLA", "loop_train_speedup", ".2f"),
    ("train.py eval x XLA", "loop_eval_speedup", ".2f"),
]
