"""Benchmarks: throughput of the paper's networks, the paper's Figure 1, and how cost grows.

    python -m nmfjax.bench --output bench            # the full suite (minutes on 2 CPU cores)
    python -m nmfjax.bench --tiny --output /tmp/b     # about a minute: keeps the code working

Every figure is the median over ``--repeats`` timed calls after one warm-up
call; compile time is reported apart. Prints tables and writes
``OUTPUT/bench.json`` and ``OUTPUT/bench.png``.

* ``throughput``: per model and batch size, train-step images/s (the real
  jitted step: gather, augmentation, forward, backward, Adam) and eval images/s;
  achieved GFLOP/s from XLA's cost analysis and its fraction of ``--peak_gflops``;
  peak memory of the compiled step (arguments + outputs + temporaries).
* ``figure1``: the paper's Figure 1: backward time and memory of the CNN,
  and of the CNMF network with the "unrolled", "approx" and "implicit"
  backward, relative to the CNN, at N in {5, 20, 50}.
* ``scaling``: train-step time of CNMF+1x1 against N and against batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nmfjax import cli, configuration, evaluation, models, ops, parallel, plots, training

# Two AVX2 cores with two FMA units each at ~3 GHz: 2 x 2 x 8 lanes x 2 flops x 3e9.
DEFAULT_PEAK_GFLOPS = 190.0


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the suite measures: models, batch sizes, N values and repeats (full or tiny)."""

    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    figure1_iterations: tuple[int, ...]
    figure1_batch: int
    scaling_iterations: tuple[int, ...]
    scaling_batch_sizes: tuple[int, ...]
    repeats: int


FULL = Sizes(
    models=("cnn", "cnmf", "cnn_1x1", "cnmf_1x1"),
    batch_sizes=(50, 200),
    figure1_iterations=(5, 20, 50),
    figure1_batch=50,
    scaling_iterations=(1, 5, 10, 20, 50),
    scaling_batch_sizes=(10, 25, 50, 100, 200),
    repeats=5,
)
TINY = Sizes(
    models=("cnmf_1x1",),
    batch_sizes=(4,),
    figure1_iterations=(2,),
    figure1_batch=4,
    scaling_iterations=(2,),
    scaling_batch_sizes=(4,),
    repeats=2,
)


def _median_seconds(function, *args, repeats: int) -> float:
    jax.block_until_ready(function(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compile(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def uncounted_loop_flops(spec: models.NetworkSpec, batch_size: int) -> float:
    """FLOPs of the forward NMF iterations that XLA's cost analysis leaves out.

    XLA counts the body of a while loop once, whatever its trip count; the
    forward pass runs it ``N`` times per NMF layer. Per iteration and position:
    two ``S x I`` matrix products (``4 S I``), the division and the update
    (``~2 S + 4 I``).
    """
    if not spec.uses_nmf:
        return 0.0
    size, _, channels = spec.input_shape
    total = 0.0
    for index, kernel_size in enumerate(spec.kernel_sizes):
        kernel_size = kernel_size or size
        out = size - kernel_size + 1
        features, groups = spec.block_features[index], spec.groups[index]
        inputs, hidden = kernel_size * kernel_size * channels // groups, features // groups
        positions = batch_size * out * out * groups
        total += (spec.nmf.iterations - 1) * positions * (4 * inputs * hidden + 2 * inputs + 4 * hidden)
        size, channels = (out // 2 if spec.pooling[index] else out), features
    return total


def _peak_bytes(compiled) -> int:
    memory = compiled.memory_analysis()
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


def _config(model: str, batch_size: int, iterations: int = 20, gradient: str = "approx"):
    config = configuration.default_config()
    config.model.architecture = model
    config.batch_size = config.eval_batch_size = batch_size
    config.model.nmf.iterations = iterations
    config.model.nmf.gradient = gradient
    return config


def _synthetic_data(trainer: training.Trainer, count: int):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.int32)
    return trainer.put_replicated(images), trainer.put_replicated(labels)


def measure_train_and_eval(
    model: str, batch_size: int, repeats: int, peak_gflops: float, iterations: int = 20, devices: int | None = None
) -> dict:
    """Train-step and eval throughput of one model at one batch size, data-parallel over the first
    ``devices`` devices (default: as many as divide the batch).
    """
    if devices is None:
        devices = parallel.largest_dividing_count(jax.device_count(), (batch_size,))
    config = _config(model, batch_size, iterations)
    spec = configuration.validate_config(config, devices)
    trainer = training.Trainer(config, spec, parallel.data_mesh(jax.devices()[:devices]))
    images, labels = _synthetic_data(trainer, 2 * batch_size)
    batch = np.arange(batch_size, dtype=np.int32)
    key = trainer.step_key(1, 0)
    state = trainer.initial_state

    totals = evaluation.no_metrics(trainer.mesh)
    train_compiled, train_compile_seconds = _compile(trainer.train_step, state, images, labels, batch, key, totals)
    eval_args = (state.params, state.batch_stats, images, labels, batch, totals, np.int32(0))
    eval_compiled, eval_compile_seconds = _compile(trainer.evaluator.step, *eval_args)
    # The train step donates its state: thread it through the timed calls.
    holder = {"state": state}

    def train_once():
        holder["state"], metrics = train_compiled(holder["state"], images, labels, batch, key, totals)
        return metrics

    train_seconds = _median_seconds(train_once, repeats=repeats)
    state = holder["state"]
    eval_seconds = _median_seconds(eval_compiled, state.params, state.batch_stats, *eval_args[2:], repeats=repeats)
    loop_flops = uncounted_loop_flops(spec, batch_size)
    # XLA's cost analysis and memory analysis of a program split over devices are those of one device.
    train_flops = _flops(train_compiled) * devices + loop_flops
    eval_flops = _flops(eval_compiled) * devices + loop_flops
    return {
        "model": model,
        "devices": devices,
        "batch_size": batch_size,
        "iterations": iterations,
        "train_images_per_second": batch_size / train_seconds,
        "eval_images_per_second": batch_size / eval_seconds,
        "train_step_ms": 1e3 * train_seconds,
        "eval_step_ms": 1e3 * eval_seconds,
        "train_gflops_per_image": train_flops / batch_size / 1e9,
        "train_gflop_per_second": train_flops / train_seconds / 1e9,
        "train_fraction_of_peak": train_flops / train_seconds / 1e9 / peak_gflops,
        "eval_gflop_per_second": eval_flops / eval_seconds / 1e9,
        "eval_fraction_of_peak": eval_flops / eval_seconds / 1e9 / peak_gflops,
        "train_peak_memory_mb": _peak_bytes(train_compiled) / 2**20,
        "eval_peak_memory_mb": _peak_bytes(eval_compiled) / 2**20,
        "train_compile_seconds": train_compile_seconds,
        "eval_compile_seconds": eval_compile_seconds,
    }


def measure_backward(model: str, gradient: str, iterations: int, batch_size: int, repeats: int) -> dict:
    """Forward and forward+backward time and memory of the loss gradient (Figure 1)."""
    spec = models.NetworkSpec(architecture=model, nmf=ops.NMFOptions(iterations=iterations, gradient=gradient))
    graphdef, params, batch_stats = models.split_state(models.Network(spec, rngs=nnx.Rngs(0)))
    images = jax.random.uniform(jax.random.key(0), (batch_size, 28, 28, 3))
    labels = jnp.arange(batch_size) % 10

    def loss(params):
        return evaluation.batch_loss(graphdef, params, batch_stats, images, labels)[0]

    forward, _ = _compile(jax.jit(loss), params)
    backward, compile_seconds = _compile(jax.jit(jax.grad(loss)), params)
    forward_seconds = _median_seconds(forward, params, repeats=repeats)
    gradient_seconds = _median_seconds(backward, params, repeats=repeats)
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


def scaling(sizes: Sizes, peak_gflops: float) -> dict[str, list[dict]]:
    """CNMF+1x1 throughput against N (at a middle batch size) and against the batch size (N = 20)."""
    batch = sizes.scaling_batch_sizes[len(sizes.scaling_batch_sizes) // 2]
    return {
        "iterations": [
            measure_train_and_eval("cnmf_1x1", batch, sizes.repeats, peak_gflops, n) for n in sizes.scaling_iterations
        ],
        "batch_size": [
            measure_train_and_eval("cnmf_1x1", b, sizes.repeats, peak_gflops) for b in sizes.scaling_batch_sizes
        ],
    }


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    header = " | ".join(title for title, _, _ in columns)
    lines = [f"| {header} |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format(row[key], fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


THROUGHPUT_COLUMNS = [
    ("model", "model", "s"),
    ("devices", "devices", "d"),
    ("batch", "batch_size", "d"),
    ("train img/s", "train_images_per_second", ".0f"),
    ("eval img/s", "eval_images_per_second", ".0f"),
    ("train GFLOP/img", "train_gflops_per_image", ".3f"),
    ("train GFLOP/s", "train_gflop_per_second", ".1f"),
    ("train % peak", "train_fraction_of_peak", ".1%"),
    ("eval GFLOP/s", "eval_gflop_per_second", ".1f"),
    ("train peak MB/device", "train_peak_memory_mb", ".0f"),
    ("eval peak MB/device", "eval_peak_memory_mb", ".0f"),
    ("compile s (train/eval)", "train_compile_seconds", ".1f"),
]
SCALING_COLUMNS = [("N", "iterations", "d"), *THROUGHPUT_COLUMNS[1:6]]

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


def run(sizes: Sizes, output: pathlib.Path, peak_gflops: float) -> dict:
    """The whole suite: prints its tables and writes ``bench.json`` and ``bench.png`` to ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "device_count": jax.device_count(),
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "peak_gflops": peak_gflops,
        "repeats": sizes.repeats,
    }
    # One device next to all of them (one per core by default), measured in the same process.
    device_counts = sorted({1, jax.device_count()})
    results["throughput"] = [
        measure_train_and_eval(model, batch, sizes.repeats, peak_gflops, devices=count)
        for model in sizes.models
        for batch in sizes.batch_sizes
        for count in device_counts
    ]
    print("\nThroughput (N=20):\n" + _table(results["throughput"], THROUGHPUT_COLUMNS), flush=True)
    results["figure1"] = figure1(sizes)
    print("\nFigure 1 (backward of the whole network):\n" + _table(results["figure1"], FIGURE1_COLUMNS), flush=True)
    results["scaling"] = scaling(sizes, peak_gflops)
    for name, rows in results["scaling"].items():
        print(f"\nCNMF+1x1 against {name}:\n" + _table(rows, SCALING_COLUMNS), flush=True)
    (output / "bench.json").write_text(json.dumps(results, indent=2))
    plots.plot_bench(results, output / "bench.png")
    print(f"\nwrote {output / 'bench.json'} and {output / 'bench.png'}")
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m nmfjax.bench``."""
    parser = cli.ArgumentParser(
        prog="python -m nmfjax.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="bench", help="folder for bench.json and bench.png")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    parser.add_argument("--repeats", type=cli.positive_int, help="timed calls per figure (default 5; tiny: 2)")
    parser.add_argument(
        "--peak_gflops", type=cli.positive_float, default=DEFAULT_PEAK_GFLOPS, help="the machine's peak GFLOP/s"
    )
    parser.add_argument(
        "--cpu_devices", type=cli.positive_int, help="XLA devices on a CPU (default: one per core; XLA_FLAGS wins)"
    )
    args = parser.parse_args(argv)
    # One device per core; each measurement uses as many of them as divide its batch.
    parallel.use_cpu_devices(args.cpu_devices)
    output = pathlib.Path(args.output)
    if output.exists() and not output.is_dir():
        cli.fail(f"--output {output} is a file; give a folder for bench.json and bench.png.")
    sizes = TINY if args.tiny else FULL
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    run(sizes, output, args.peak_gflops)


if __name__ == "__main__":
    main()
