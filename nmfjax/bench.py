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

Two more suites, each its own JSON::

    python -m nmfjax.bench --precision --output bench   # the op in tf32 and bfloat16 against float32
    python -m nmfjax.bench --gpu --data_dir DIR --output bench   # on a machine with a GPU: its table

* ``--precision`` (``precision.json``): the relative error of ``h`` and of the
  input and weight gradients of each backward mode when every product of the
  op runs in TF32 or bfloat16 instead of float32, at N in {5, 20, 50}, on a
  first-block-sized problem. On a CPU the lower precisions are emulated
  (operands rounded to their mantissa, float32 sums; see :func:`nmfjax.ops.matmul`).
* ``--gpu`` (``gpu.json``): the op's results on the GPU against the CPU's
  (float32, and TF32 and bfloat16 on the GPU's own tensor cores), train and
  eval images/s of the four networks at batch 50 and 500 (CNMF+1x1 in each
  precision), and one short ``train.py`` epoch on ``--data_dir``. Without a
  GPU it stops with an error (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nmfjax import cli, configuration, evaluation, models, ops, parallel, plots, training, workdirs

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


def _config(model: str, batch_size: int, iterations: int = 20, gradient: str = "approx", precision: str = "float32"):
    config = configuration.default_config()
    config.model.architecture = model
    config.batch_size = config.eval_batch_size = batch_size
    config.model.nmf.iterations = iterations
    config.model.nmf.gradient = gradient
    config.model.nmf.precision = precision
    return config


def _synthetic_data(trainer: training.Trainer, count: int):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.int32)
    return trainer.put_replicated(images), trainer.put_replicated(labels)


def measure_train_and_eval(
    model: str,
    batch_size: int,
    repeats: int,
    peak_gflops: float,
    iterations: int = 20,
    devices: int | None = None,
    precision: str = "float32",
) -> dict:
    """Train-step and eval throughput of one model at one batch size, data-parallel over the first
    ``devices`` devices (default: as many as divide the batch), the NMF products in ``precision``.
    """
    if devices is None:
        devices = parallel.largest_dividing_count(jax.device_count(), (batch_size,))
    config = _config(model, batch_size, iterations, precision=precision)
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
        "precision": precision,
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


def scaling(sizes: Sizes, peak_gflops: float, measured: Sequence[dict] = ()) -> dict[str, list[dict]]:
    """CNMF+1x1 throughput against N (at a middle batch size) and against the batch size (N = 20).

    A row of ``measured`` with the same model, batch size, N and device count is reused, not measured again.
    """
    known = {(row["model"], row["batch_size"], row["iterations"], row["devices"]): row for row in measured}

    def measure(batch_size: int, iterations: int = 20) -> dict:
        devices = parallel.largest_dividing_count(jax.device_count(), (batch_size,))
        row = known.get(("cnmf_1x1", batch_size, iterations, devices))
        return row or measure_train_and_eval("cnmf_1x1", batch_size, sizes.repeats, peak_gflops, iterations, devices)

    batch = sizes.scaling_batch_sizes[len(sizes.scaling_batch_sizes) // 2]
    return {
        "iterations": [measure(batch, n) for n in sizes.scaling_iterations],
        "batch_size": [measure(b) for b in sizes.scaling_batch_sizes],
    }


# --- precision of the NMF products ---

PRECISION_ITERATIONS = (5, 20, 50)


def op_problem(positions: int = 4096, features: int = 75, hidden: int = 32, seed: int = 0):
    """A first-block-sized NMF problem: L1-normalised patches ``x (positions, S)``, ``W (S, I)``
    from Uniform(0, 1) as the layers start, and an upstream gradient ``g (positions, I)``.
    """
    x_key, w_key, g_key = jax.random.split(jax.random.key(seed), 3)
    x = ops.l1_normalize(jax.random.uniform(x_key, (positions, features)))
    w = ops.positive_weights(jax.random.uniform(w_key, (features, hidden)))
    return x, w, jax.random.normal(g_key, (positions, hidden))


def op_results(problem, iterations: int, precision: str, device) -> dict[str, np.ndarray]:
    """``h`` and, per backward mode, ``dx`` and ``dW`` of ``<g, h>``, computed on ``device``."""
    x, w, g = jax.device_put(problem, device)
    results = {}
    for mode in ops.GRADIENTS:
        options = ops.NMFOptions(iterations=iterations, gradient=mode, precision=precision)

        def forward_and_backward(x, w, g, options=options):
            h, vjp = jax.vjp(lambda x, w: ops.nmf(x, w, options), x, w)
            return h, *vjp(g)

        h, dx, dw = jax.device_get(jax.jit(forward_and_backward)(x, w, g))
        results.update({"h": h, f"{mode}_dx": dx, f"{mode}_dw": dw})
    return results


def _relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def op_errors(device, reference_device, precisions, iterations=PRECISION_ITERATIONS, problem=None) -> list[dict]:
    """Relative error (Frobenius) of the op on ``device`` in each of ``precisions`` against float32
    on ``reference_device``: of ``h`` and of each backward mode's ``dx`` and ``dW``.
    """
    problem = op_problem() if problem is None else problem
    rows = []
    for n in iterations:
        reference = op_results(problem, n, "float32", reference_device)
        for precision in precisions:
            results = op_results(problem, n, precision, device)
            errors = {name: _relative_error(value, reference[name]) for name, value in results.items()}
            rows.append({"iterations": n, "precision": precision, "device": str(device), **errors})
    return rows


PRECISION_COLUMNS = [
    ("N", "iterations", "d"),
    ("precision", "precision", "s"),
    ("h", "h", ".1e"),
    *[(f"{mode} dW", f"{mode}_dw", ".1e") for mode in ops.GRADIENTS],
    *[(f"{mode} dx", f"{mode}_dx", ".1e") for mode in ops.GRADIENTS],
]


def precision_study(output: pathlib.Path, iterations=PRECISION_ITERATIONS, positions: int = 4096) -> list[dict]:
    """``--precision``: the op's error in TF32 and bfloat16 against float32 on this machine's first
    device (emulated on a CPU); prints the table and writes ``precision.json``.
    """
    device = jax.devices()[0]
    rows = op_errors(device, device, ("tf32", "bfloat16"), iterations, op_problem(positions))
    emulated = device.platform == "cpu"
    print(
        f"\nRelative error against float32 on {device.device_kind}"
        + (" (tf32 and bfloat16 emulated: operands rounded, float32 sums)" if emulated else "")
        + ":\n"
        + _table(rows, PRECISION_COLUMNS),
        flush=True,
    )
    payload = {"device": str(device.device_kind), "platform": device.platform, "emulated": emulated, "rows": rows}
    workdirs.write_output(output / "precision.json", json.dumps(payload, indent=2))
    print(f"\nwrote {output / 'precision.json'}")
    return rows


# --- the GPU table ---


@dataclasses.dataclass(frozen=True)
class GPUSizes:
    """What ``--gpu`` measures (the full table, or tiny sizes that keep the code working on a CPU)."""

    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    precision_model: str  # measured in each of ``precisions`` as well
    precisions: tuple[str, ...]
    iterations: tuple[int, ...]
    problem_positions: int
    train: dict[str, Any]  # config overrides of the training run (CNMF+1x1, one epoch)
    repeats: int


GPU_FULL = GPUSizes(
    models=("cnn", "cnmf", "cnn_1x1", "cnmf_1x1"),
    batch_sizes=(50, 500),
    precision_model="cnmf_1x1",
    precisions=ops.PRECISIONS,
    iterations=PRECISION_ITERATIONS,
    problem_positions=28_800,  # block 1 of a batch of 50
    train={"num_train_examples": 10_000},
    repeats=5,
)
GPU_TINY = GPUSizes(
    models=("cnmf_1x1",),
    batch_sizes=(4,),
    precision_model="cnmf_1x1",
    precisions=("float32", "tf32"),
    iterations=(2,),
    problem_positions=64,
    train={"num_train_examples": 20, "batch_size": 4, "eval_batch_size": 4, "model.nmf.iterations": 2},
    repeats=1,
)


def gpu_suite(
    device, data_dir: str | None, output: pathlib.Path, sizes: GPUSizes = GPU_FULL, peak_gflops: float = math.nan
) -> dict:
    """``--gpu``: the op on ``device`` against the CPU, the throughput table on the default
    backend's devices, and a short training run (one epoch of CNMF+1x1 on ``data_dir``, with
    ``sizes.train``); prints the tables and writes ``gpu.json``. ``device`` is normally a GPU;
    the tests pass a CPU device, so that every step runs where there is no GPU.
    """
    started = time.perf_counter()
    results: dict[str, Any] = {
        "device": str(device.device_kind),
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
    }
    problem = op_problem(positions=sizes.problem_positions)
    results["op_against_cpu"] = op_errors(device, jax.devices("cpu")[0], ops.PRECISIONS, sizes.iterations, problem)
    print(
        f"\nThe op on {device.device_kind} against float32 on the CPU:\n"
        + _table(results["op_against_cpu"], PRECISION_COLUMNS),
        flush=True,
    )
    cases = [(model, batch, "float32") for model in sizes.models for batch in sizes.batch_sizes]
    cases += [
        (sizes.precision_model, batch, p) for batch in sizes.batch_sizes for p in sizes.precisions if p != "float32"
    ]
    results["throughput"] = [
        measure_train_and_eval(model, batch, sizes.repeats, peak_gflops, precision=precision)
        for model, batch, precision in cases
    ]
    print("\nThroughput (N=20):\n" + _table(results["throughput"], GPU_THROUGHPUT_COLUMNS), flush=True)
    overrides = {"data_dir": data_dir, "download": False, "num_epochs": 1, **sizes.train}
    config = configuration.apply_overrides(configuration.default_config(), overrides)
    with tempfile.TemporaryDirectory() as workdir:
        row = training.train_and_evaluate(config, workdir)
    command = "python train.py --config configs/cnmf_1x1.py " + " ".join(
        f"--config.{k}={v}" for k, v in overrides.items()
    )
    results["train"] = {"command": command, **row}
    results["seconds"] = time.perf_counter() - started
    workdirs.write_output(output / "gpu.json", json.dumps(results, indent=2))
    print(f"\nwrote {output / 'gpu.json'} ({results['seconds']:.0f} s in all)")
    return results


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
GPU_THROUGHPUT_COLUMNS = [
    *THROUGHPUT_COLUMNS[:3],
    ("precision", "precision", "s"),
    *THROUGHPUT_COLUMNS[3:5],
    ("train GFLOP/s", "train_gflop_per_second", ".0f"),
    ("eval GFLOP/s", "eval_gflop_per_second", ".0f"),
    *THROUGHPUT_COLUMNS[9:],
]

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
    results["scaling"] = scaling(sizes, peak_gflops, results["throughput"])
    for name, rows in results["scaling"].items():
        print(f"\nCNMF+1x1 against {name}:\n" + _table(rows, SCALING_COLUMNS), flush=True)
    workdirs.write_output(output / "bench.json", json.dumps(results, indent=2))
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
        "--peak_gflops",
        type=cli.positive_float,
        help=f"the machine's peak GFLOP/s (default {DEFAULT_PEAK_GFLOPS:g}, two AVX2 cores; --gpu: none)",
    )
    parser.add_argument(
        "--cpu_devices", type=cli.positive_int, help="XLA devices on a CPU (default: one per core; XLA_FLAGS wins)"
    )
    suite = parser.add_mutually_exclusive_group()
    suite.add_argument("--precision", action="store_true", help="the op in tf32 and bfloat16 against float32")
    suite.add_argument("--gpu", action="store_true", help="the GPU table (needs a GPU and --data_dir)")
    parser.add_argument("--data_dir", help="TFDS data directory with CIFAR-10, for --gpu's training run")
    args = parser.parse_args(argv)
    # One device per core; each measurement uses as many of them as divide its batch.
    parallel.use_cpu_devices(args.cpu_devices)
    output = pathlib.Path(args.output)
    if output.exists() and not output.is_dir():
        cli.fail(f"--output {output} is a file; give a folder for bench.json and bench.png.")
    with cli.exit_on_errors(), workdirs.storage_errors(output, "Choose another --output."):
        output.mkdir(parents=True, exist_ok=True)  # before minutes of measuring
    with cli.exit_on_errors():
        if args.gpu:
            gpu = _gpus()[0]
            if not args.data_dir:
                cli.fail("--gpu trains for one epoch on CIFAR-10: give its TFDS data directory as --data_dir.")
            gpu_sizes = GPU_TINY if args.tiny else GPU_FULL
            repeats = args.repeats or gpu_sizes.repeats
            peak = args.peak_gflops or math.nan
            gpu_suite(gpu, args.data_dir, output, dataclasses.replace(gpu_sizes, repeats=repeats), peak)
            return
        if args.precision:
            precision_study(output, *(((2,), 64) if args.tiny else ()))
            return
    sizes = TINY if args.tiny else FULL
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    run(sizes, output, args.peak_gflops or DEFAULT_PEAK_GFLOPS)


def _gpus() -> list:
    """The GPUs JAX sees; with none, the command stops with one line saying so."""
    try:
        return jax.devices("gpu")
    except RuntimeError:
        cli.fail(
            f"no GPU is present: JAX sees only {jax.default_backend()} devices ({jax.devices()[0].device_kind}). "
            "On a machine with an NVIDIA GPU, install with pip install -e '.[cuda12]' and run again."
        )


if __name__ == "__main__":
    main()
