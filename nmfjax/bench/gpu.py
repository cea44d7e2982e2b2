"""The GPU table (``--gpu``): the op on the GPU against the CPU, the throughput of the four networks
in each precision, and one training epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import tempfile
import time
from typing import Any

import jax

from nmfjax import cli, configuration, ops, training
from nmfjax.bench.precision import PRECISION_COLUMNS, PRECISION_ITERATIONS, op_errors, op_problem
from nmfjax.bench.throughput import THROUGHPUT_COLUMNS, measure_train_and_eval
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
        + markdown_table(results["op_against_cpu"], PRECISION_COLUMNS),
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
    print("\nThroughput (N=20):\n" + markdown_table(results["throughput"], GPU_THROUGHPUT_COLUMNS), flush=True)
    overrides = {"data_dir": data_dir, "download": False, "num_epochs": 1, **sizes.train}
    config = configuration.apply_overrides(configuration.default_config(), overrides)
    with tempfile.TemporaryDirectory() as workdir:
        row = training.train_and_evaluate(config, workdir)
    command = "python train.py --config configs/cnmf_1x1.py " + " ".join(
        f"--config.{k}={v}" for k, v in overrides.items()
    )
    results["train"] = {"command": command, **row}
    results["seconds"] = time.perf_counter() - started
    write_output(output / "gpu.json", json.dumps(results, indent=2))
    print(f"\nwrote {output / 'gpu.json'} ({results['seconds']:.0f} s in all)")
    return results


GPU_THROUGHPUT_COLUMNS = [
    *THROUGHPUT_COLUMNS[:3],
    ("precision", "precision", "s"),
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
