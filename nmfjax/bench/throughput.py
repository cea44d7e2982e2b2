"""Train-step and eval-step throughput of the paper's networks on synthetic data, and how it grows
with N and the batch size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from nmfjax import configuration, evaluation, models, parallel
from nmfjax.bench import timing
from nmfjax.trainer import Trainer


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
    loop_models: tuple[str, ...] = ("cnmf_1x1",)
    loop_batch: int = 50
    loop_steps: int = 20


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
    loop_batch=4,
    loop_steps=3,
)


#: The ways the NMF forward pass runs, by name (a table's "kernel" column), as NMFOptions fields. XLA's
#: while loop of the N updates, the same unrolled (``NMFOptions.unroll``), and the fused kernel.
NMF_VARIANTS: dict[str, dict[str, Any]] = {
    "xla": {"kernel": "xla"},
    "xla_unrolled": {"kernel": "xla", "unroll": True},
    "pallas": {"kernel": "pallas"},
}


def nmf_variant(name: str) -> dict[str, Any]:
    """The :class:`nmfjax.ops.NMFOptions` fields of a name of :data:`NMF_VARIANTS` (or of a plain ``kernel``)."""
    return NMF_VARIANTS.get(name, {"kernel": name})


def _config(model: str, batch_size: int, iterations: int = 20, **nmf_fields: Any):
    """The paper's config of ``model`` at ``batch_size``, with ``iterations`` and other NMF options
    (fields of :class:`nmfjax.ops.NMFOptions`, e.g. ``kernel="pallas"``, ``unroll=True``).
    """
    config = configuration.default_config()
    config.model.architecture = model
    config.batch_size = config.eval_batch_size = batch_size
    config.model.nmf.iterations = iterations
    for field, value in nmf_fields.items():
        config.model.nmf[field] = value
    return config


def synthetic_data(trainer: Trainer, count: int) -> tuple:
    """``count`` random uint8 CIFAR-sized images and labels, replicated on the trainer's devices."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.int32)
    return trainer.put_replicated(images), trainer.put_replicated(labels)


def synthetic_train_step(
    model: str, batch_size: int, iterations: int, devices: int | None = None, **nmf_fields: Any
) -> tuple[Trainer, models.NetworkSpec, tuple]:
    """The trainer of ``model`` at ``batch_size`` on the first ``devices`` devices (default: as many
    as divide the batch; the NMF op's ``iterations`` and ``nmf_fields``, e.g. ``kernel``), its spec,
    and the arguments of one train step on synthetic images: ``(state, images, labels, batch, key, totals)``.
    """
    if devices is None:
        devices = parallel.largest_dividing_count(jax.device_count(), (batch_size,))
    config = _config(model, batch_size, iterations, **nmf_fields)
    spec = configuration.validate_config(config, devices)
    trainer = Trainer(config, spec, parallel.data_mesh(jax.devices()[:devices]))
    images, labels = synthetic_data(trainer, 2 * batch_size)
    batch = np.arange(batch_size, dtype=np.int32)
    arguments = (
        trainer.initial_state,
        images,
        labels,
        batch,
        trainer.step_key(1, 0),
        evaluation.no_metrics(trainer.mesh),
    )
    return trainer, spec, arguments


def counted_flops(train_compiled, eval_compiled, spec: models.NetworkSpec, batch_size: int, devices: int):
    """FLOPs of one train step and one eval step over all ``devices``: XLA's cost analysis (of one
    device's share) plus the NMF iterations it leaves out
    (:func:`nmfjax.bench.timing.uncounted_loop_flops`).
    """
    loop_flops = timing.uncounted_loop_flops(spec, batch_size)
    return timing.flops(train_compiled) * devices + loop_flops, timing.flops(eval_compiled) * devices + loop_flops


@functools.cache
def xla_twin_flops(model: str, batch_size: int, iterations: int, devices: int, precision: str) -> tuple[float, float]:
    """:func:`counted_flops` of the same steps with XLA's loop: a fused kernel does the same arithmetic,
    but XLA's cost analysis counts nothing inside its custom call.
    """
    trainer, spec, (state, images, labels, batch, key, totals) = synthetic_train_step(
        model, batch_size, iterations, devices, precision=precision, kernel="xla"
    )
    train = trainer.train_step.lower(state, images, labels, batch, key, totals).compile()
    evaluate = trainer.evaluator.step.lower(
        state.params, state.batch_stats, images, labels, batch, totals, np.int32(0)
    ).compile()
    return counted_flops(train, evaluate, spec, batch_size, trainer.mesh.size)


def measure_train_and_eval(
    model: str,
    batch_size: int,
    repeats: int,
    peak_gflops: float,
    iterations: int = 20,
    devices: int | None = None,
    precision: str = "float32",
    kernel: str = "xla",
) -> dict:
    """Train-step and eval throughput of one model at one batch size, data-parallel over the first
    ``devices`` devices (default: as many as divide the batch), the NMF products in ``precision``,
    the NMF forward by ``kernel``, a name of :data:`NMF_VARIANTS`.
    """
    trainer, spec, (state, images, labels, batch, key, totals) = synthetic_train_step(
        model, batch_size, iterations, devices, precision=precision, **nmf_variant(kernel)
    )
    devices = trainer.mesh.size
    train_compiled, train_compile_seconds = timing.compile_timed(
        trainer.train_step, state, images, labels, batch, key, totals
    )
    eval_args = (state.params, state.batch_stats, images, labels, batch, totals, np.int32(0))
    eval_compiled, eval_compile_seconds = timing.compile_timed(trainer.evaluator.step, *eval_args)
    # The train step donates its state: thread it through the timed calls.
    holder = {"state": state}

    def train_once():
        holder["state"], metrics = train_compiled(holder["state"], images, labels, batch, key, totals)
        return metrics

    train_seconds = timing.median_seconds(train_once, repeats=repeats)
    state = holder["state"]
    eval_seconds = timing.median_seconds(
        eval_compiled, state.params, state.batch_stats, *eval_args[2:], repeats=repeats
    )
    if spec.nmf.kernel == "xla":
        train_flops, eval_flops = counted_flops(train_compiled, eval_compiled, spec, batch_size, devices)
    else:
        train_flops, eval_flops = xla_twin_flops(model, batch_size, iterations, devices, precision)
    return {
        "model": model,
        "devices": devices,
        "batch_size": batch_size,
        "iterations": iterations,
        "precision": precision,
        "kernel": kernel,
        "train_images_per_second": batch_size / train_seconds,
        "eval_images_per_second": batch_size / eval_seconds,
        "train_step_ms": 1e3 * train_seconds,
        "eval_step_ms": 1e3 * eval_seconds,
        "train_gflops_per_image": train_flops / batch_size / 1e9,
        "train_gflop_per_second": train_flops / train_seconds / 1e9,
        "train_fraction_of_peak": train_flops / train_seconds / 1e9 / peak_gflops,
        "eval_gflop_per_second": eval_flops / eval_seconds / 1e9,
        "eval_fraction_of_peak": eval_flops / eval_seconds / 1e9 / peak_gflops,
        "train_peak_memory_mb": timing.peak_bytes(train_compiled) / 2**20,
        "eval_peak_memory_mb": timing.peak_bytes(eval_compiled) / 2**20,
        "train_compile_seconds": train_compile_seconds,
        "eval_compile_seconds": eval_compile_seconds,
    }


def scaling(sizes: Sizes, peaks: Mapping[int, float], measured: Sequence[dict] = ()) -> dict[str, list[dict]]:
    """CNMF+1x1 throughput against N (at a middle batch size) and against the batch size (N = 20);
    ``peaks`` is the measured peak GFLOP/s of each device count (:func:`nmfjax.bench.peak.measure_peak_gflops`).

    A row of ``measured`` with the same model, batch size, N and device count is reused, not measured again.
    """
    known = {(row["model"], row["batch_size"], row["iterations"], row["devices"]): row for row in measured}

    def measure(batch_size: int, iterations: int = 20) -> dict:
        devices = parallel.largest_dividing_count(jax.device_count(), (batch_size,))
        row = known.get(("cnmf_1x1", batch_size, iterations, devices))
        return row or measure_train_and_eval("cnmf_1x1", batch_size, sizes.repeats, peaks[devices], iterations, devices)

    batch = sizes.scaling_batch_sizes[len(sizes.scaling_batch_sizes) // 2]
    return {
        "iterations": [measure(batch, n) for n in sizes.scaling_iterations],
        "batch_size": [measure(b) for b in sizes.scaling_batch_sizes],
    }


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
    ("eval % peak", "eval_fraction_of_peak", ".1%"),
    ("train peak MB/device", "train_peak_memory_mb", ".0f"),
    ("eval peak MB/device", "eval_peak_memory_mb", ".0f"),
    ("compile s (train/eval)", "train_compile_seconds", ".1f"),
]
SCALING_COLUMNS = [("N", "iterations", "d"), *THROUGHPUT_COLUMNS[1:6]]


def unroll_study(sizes: Sizes, peak_gflops: float, iterations: int = 20) -> list[dict]:
    """Each NMF network at ``sizes.loop_batch`` with XLA's while loop and with it unrolled
    (``NMFOptions.unroll``): compile seconds and images/s of the train and eval steps, alternated
    so that both see the machine alike.
    """
    devices = parallel.largest_dividing_count(jax.device_count(), (sizes.loop_batch,))
    return [
        measure_train_and_eval(model, sizes.loop_batch, sizes.repeats, peak_gflops, iterations, devices, kernel=kernel)
        for model in sizes.models
        if models.NetworkSpec(architecture=model).uses_nmf
        for kernel in ("xla", "xla_unrolled")
    ]


UNROLL_COLUMNS = [
    ("model", "model", "s"),
    ("kernel", "kernel", "s"),
    *THROUGHPUT_COLUMNS[1:5],
    ("train compile (s)", "train_compile_seconds", ".1f"),
    ("eval compile (s)", "eval_compile_seconds", ".1f"),
]
