"""The GPU table (``--gpu``): the op on the GPU against the CPU, the throughput of the four networks
in each precision with XLA's NMF loop and with the fused kernel, a profile of CNMF+1x1's train step
with each, and a training epoch with each, projected to the paper's recipe.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import time
from typing import Any

import jax

from nmfjax import cli, configuration, models, ops, parallel, training
from nmfjax.bench.peak import measure_peak_gflops
from nmfjax.bench.precision import PRECISION_COLUMNS, PRECISION_ITERATIONS, op_errors, op_problem
from nmfjax.bench.profile import PROFILE_COLUMNS, profile_step
from nmfjax.bench.throughput import NMF_VARIANTS, THROUGHPUT_COLUMNS, measure_train_and_eval, nmf_variant
from nmfjax.outputs import write_output
from nmfjax.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class GPUSizes:
    """What ``--gpu`` measures (the full table, or tiny sizes that keep the code working on a CPU)."""

    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    precision_model: str  # measured in each of ``precisions`` as well
    precisions: tuple[str, ...]
    iterations: tuple[int, ...]
    problem_positions: int
    train: dict[str, Any]  # config overrides of the training runs (CNMF+1x1, one per kernel)
    repeats: int
    kernels: tuple[str, ...] = tuple(NMF_VARIANTS)  # XLA's loop, unrolled, and the fused kernel
    profile_steps: int = 20
    peak_size: int = 8192  # the side of the float32 products that measure the device's peak


GPU_FULL = GPUSizes(
    models=("cnn", "cnmf", "cnn_1x1", "cnmf_1x1"),
    batch_sizes=(50, 500),
    precision_model="cnmf_1x1",
    precisions=ops.PRECISIONS,
    iterations=PRECISION_ITERATIONS,
    problem_positions=28_800,  # block 1 of a batch of 50
    train={"num_train_examples": 10_000, "num_epochs": 2},
    repeats=5,
)
GPU_TINY = GPUSizes(
    models=("cnmf_1x1",),
    batch_sizes=(4,),
    precision_model="cnmf_1x1",
    precisions=("float32",),  # (the other precisions' rows differ only in their NMFOptions)
    iterations=(2,),
    problem_positions=64,
    train={
        "num_train_examples": 8,
        "num_epochs": 1,
        "batch_size": 4,
        "eval_batch_size": 4,
        "model.nmf.iterations": 2,
    },
    repeats=1,
    profile_steps=2,
    peak_size=256,
)

# The paper's recipe on all of CIFAR-10 (section 2.6): 500 epochs of 50,000 images, tested on 10,000 each.
PAPER_EPOCHS, PAPER_TRAIN_IMAGES, PAPER_TEST_IMAGES = 500, 50_000, 10_000


def paper_recipe_minutes(row: dict) -> float:
    """Minutes the paper's recipe would take at the train and test throughput of an epoch's ``row``."""
    epoch = PAPER_TRAIN_IMAGES / row["train_images_per_second"] + PAPER_TEST_IMAGES / row["eval_images_per_second"]
    return PAPER_EPOCHS * epoch / 60


def gpu_suite(device, data_dir: str | None, output: pathlib.Path, sizes: GPUSizes = GPU_FULL) -> dict:
    """``--gpu``: the op on ``device`` against the CPU, the throughput table on the default
    backend's devices with each of ``sizes.kernels``, a profile of one train step with each, and a
    short training run with each (CNMF+1x1 on ``data_dir``, with ``sizes.train``) projected to the
    paper's recipe; prints the tables and writes ``gpu.json``. ``device`` is normally a GPU;
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
        + markdown_table(results["op_against_cpu"], PRECISION_COLUMNS),
        flush=True,
    )
    cases = [
        (model, batch, "float32", kernel)
        for model in sizes.models
        for batch in sizes.batch_sizes
        for kernel in (sizes.kernels if models.NetworkSpec(architecture=model).uses_nmf else ("xla",))
    ]
    cases += [
        (sizes.precision_model, batch, precision, kernel)
        for batch in sizes.batch_sizes
        for precision in sizes.precisions
        if precision != "float32"
        for kernel in sizes.kernels
    ]
    # Each row's yardstick: float32 products on the devices it runs on (as many as divide its batch).
    counts = {parallel.largest_dividing_count(jax.device_count(), (batch,)) for batch in sizes.batch_sizes}
    peaks = {count: measure_peak_gflops(jax.devices()[:count], sizes.peak_size, sizes.repeats) for count in counts}
    results["peak_gflops"] = {str(count): peak for count, peak in peaks.items()}
    results["throughput"] = [
        measure_train_and_eval(
            model,
            batch,
            sizes.repeats,
            peaks[parallel.largest_dividing_count(jax.device_count(), (batch,))],
            precision=precision,
            kernel=kernel,
        )
        for model, batch, precision, kernel in cases
    ]
    print("\nThroughput (N=20):\n" + markdown_table(results["throughput"], GPU_THROUGHPUT_COLUMNS), flush=True)
    results["profile"] = [
        profile_step(sizes.precision_model, sizes.batch_sizes[0], kernel, sizes.profile_steps)
        for kernel in sizes.kernels
    ]
    print("\nOne train step, profiled:\n" + markdown_table(results["profile"], PROFILE_COLUMNS), flush=True)
    results["train"] = [train_epochs(data_dir, sizes.train, kernel) for kernel in sizes.kernels]
    print(
        "\nTraining, and the paper's recipe (500 epochs of all CIFAR-10) at its last epoch's speed:\n"
        + markdown_table(results["train"], TRAIN_COLUMNS),
        flush=True,
    )
    results["seconds"] = time.perf_counter() - started
    write_output(output / "gpu.json", json.dumps(results, indent=2))
    print(f"\nwrote {output / 'gpu.json'} ({results['seconds']:.0f} s in all)")
    return results


def train_epochs(data_dir: str | None, overrides: dict[str, Any], kernel: str) -> dict:
    """``train.py``'s run of CNMF+1x1 with ``overrides`` and the NMF op's ``kernel`` (a name of
    :data:`~nmfjax.bench.throughput.NMF_VARIANTS`) in a temporary workdir: its last epoch's row, the
    command, and the paper's recipe projected from that epoch.
    """
    variant = {f"model.nmf.{field}": value for field, value in nmf_variant(kernel).items()}
    overrides = {"data_dir": data_dir, "download": False, **overrides, **variant}
    config = configuration.apply_overrides(configuration.default_config(), overrides)
    with tempfile.TemporaryDirectory() as workdir:
        row = training.train_and_evaluate(config, workdir)
    command = "python train.py --config configs/cnmf_1x1.py " + " ".join(
        f"--config.{key}={value}" for key, value in overrides.items()
    )
    return {"command": command, "kernel": kernel, **row, "paper_recipe_minutes": paper_recipe_minutes(row)}


TRAIN_COLUMNS = [
    ("kernel", "kernel", "s"),
    ("epoch", "epoch", "d"),
    ("train img/s", "train_images_per_second", ".0f"),
    ("eval img/s", "eval_images_per_second", ".0f"),
    ("test accuracy", "test_accuracy", ".2%"),
    ("paper's recipe (min)", "paper_recipe_minutes", ".1f"),
]

GPU_THROUGHPUT_COLUMNS = [
    *THROUGHPUT_COLUMNS[:3],
    ("precision", "precision", "s"),
    ("kernel", "kernel", "s"),
    *THROUGHPUT_COLUMNS[3:5],
    ("train GFLOP/s", "train_gflop_per_second", ".0f"),
    ("eval GFLOP/s", "eval_gflop_per_second", ".0f"),
    *THROUGHPUT_COLUMNS[9:],
]


def gpus() -> list:
    """The GPUs JAX sees; with none, the command stops with one line saying so."""
    try:
        return jax.devices("gpu")
    except RuntimeError:
        cli.fail(
            f"no GPU is present: JAX sees only {jax.default_backend()} devices ({jax.devices()[0].device_kind}). "
            "On a machine with an NVIDIA GPU, install with pip install -e '.[cuda12]' and run again."
        )
