"""What ``train.py``'s loop adds to the bare step: an epoch of :meth:`nmfjax.trainer.Trainer.train_epoch`
and :meth:`~nmfjax.trainer.Trainer.evaluate` (the calls of ``config.steps_per_call`` steps, their keys,
the stop checks) timed next to the compiled train and eval steps alone, in one run on one trainer.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from nmfjax.bench import timing
from nmfjax.bench.throughput import counted_flops, synthetic_data, synthetic_train_step, xla_twin_flops


def measure_loop(
    model: str,
    batch_size: int,
    peak_gflops: float,
    steps: int = 20,
    repeats: int = 3,
    iterations: int = 20,
    precision: str = "float32",
    kernel: str | None = None,
) -> dict:
    """Train and eval images/s of ``model`` at ``batch_size``: the bare compiled steps (median of
    ``steps`` calls) and ``train.py``'s epoch path over ``steps`` batches of synthetic resident images
    (median of ``repeats`` epochs after a warm-up one; no progress bar), each as GFLOP/s and as a
    fraction of ``peak_gflops``; ``loop_*_ratio`` is the epoch path's speed over the bare step's. The
    NMF products in ``precision``, the NMF iterations by ``kernel`` (default: the config's, as ``train.py``).
    """
    fields: dict[str, Any] = {} if kernel is None else {"kernel": kernel}
    trainer, spec, (state, _, _, batch, key, totals) = synthetic_train_step(
        model, batch_size, iterations, precision=precision, **fields
    )
    images, labels = synthetic_data(trainer, steps * batch_size)
    trainer.compile(state, images, labels, images, labels)
    train_compiled = trainer.train_step.lower(state, images, labels, batch, key, totals).compile()
    eval_args = (images, labels, batch, totals, np.int32(0))
    eval_compiled = trainer.evaluator.step.lower(state.params, state.batch_stats, *eval_args).compile()
    holder = {"state": state}

    def train_once():
        holder["state"], metrics = train_compiled(holder["state"], images, labels, batch, key, totals)
        return metrics

    bare_train = batch_size / timing.median_seconds(train_once, repeats=steps)
    state = holder["state"]
    bare_eval = batch_size / timing.median_seconds(
        eval_compiled, state.params, state.batch_stats, *eval_args, repeats=steps
    )
    loop_train, loop_eval = [], []
    for epoch in range(repeats + 1):  # the first is a warm-up
        state, train_metrics = trainer.train_epoch(state, epoch + 1, images, labels, progress=False)
        eval_metrics = trainer.evaluate(state, images, labels)
        if epoch:
            loop_train.append(train_metrics["train_images_per_second"])
            loop_eval.append(eval_metrics["eval_images_per_second"])
    devices = trainer.mesh.size
    if spec.nmf.kernel == "xla":
        train_flops, eval_flops = counted_flops(train_compiled, eval_compiled, spec, batch_size, devices)
    else:
        train_flops, eval_flops = xla_twin_flops(model, batch_size, iterations, devices, precision)
    train_gflop, eval_gflop = train_flops / batch_size / 1e9, eval_flops / batch_size / 1e9
    row: dict[str, Any] = {
        "model": model,
        "devices": devices,
        "batch_size": batch_size,
        "precision": precision,
        "kernel": spec.nmf.kernel,
        "steps_per_call": trainer.steps_per_call,
        "bare_train_images_per_second": bare_train,
        "loop_train_images_per_second": statistics.median(loop_train),
        "bare_eval_images_per_second": bare_eval,
        "loop_eval_images_per_second": statistics.median(loop_eval),
        "train_gflops_per_image": train_gflop,
        "eval_gflops_per_image": eval_gflop,
    }
    for part in ("train", "eval"):
        for path in ("bare", "loop"):
            gflops = row[f"{path}_{part}_images_per_second"] * row[f"{part}_gflops_per_image"]
            row[f"{path}_{part}_fraction_of_peak"] = gflops / peak_gflops
        row[f"loop_{part}_ratio"] = row[f"loop_{part}_images_per_second"] / row[f"bare_{part}_images_per_second"]
    return row


#: The loop's figures in a row of :func:`compare_in_rounds`.
LOOP_KEYS = (
    "loop_train_images_per_second",
    "loop_eval_images_per_second",
    "loop_train_fraction_of_peak",
    "loop_eval_fraction_of_peak",
)


def compare_in_rounds(
    variants: Sequence[str], measure: Callable[[str], dict], rounds: int, peaks: Mapping[str, float]
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Measures each variant once per round, the variants in turn, so that all see the machine alike.

    ``measure(variant)`` returns a row of :func:`nmfjax.bench.throughput.measure_train_and_eval` with the
    ``loop_*`` figures of :func:`measure_loop`. Returns one row per variant (median images/s over the
    rounds, their GFLOP/s and fraction of ``peaks[variant]``; ``*_speedup``: the median over the rounds
    of the ratio to the first variant within a round, which holds when the machine's speed drifts
    between rounds by more than the difference measured), and every round's rows by variant.
    """
    measured: dict[str, list[dict]] = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant in variants:
            measured[variant].append(measure(variant))
    reference = measured[variants[0]]
    rows = []
    for variant in variants:
        row = {"variant": variant, **_median_row(measured[variant], peaks[variant]), "peak_gflops": peaks[variant]}
        for key in LOOP_KEYS:
            row[key] = statistics.median(measure[key] for measure in measured[variant])
        for key in ("train_images_per_second", "eval_images_per_second", *LOOP_KEYS[:2]):
            ratios = [mine[key] / theirs[key] for mine, theirs in zip(measured[variant], reference, strict=True)]
            row[key.replace("images_per_second", "speedup")] = statistics.median(ratios)
        rows.append(row)
    return rows, measured


def _median_row(rows: list[dict], peak_gflops: float) -> dict[str, Any]:
    """One row of the rounds: the median images/s of train and eval, their GFLOP/s and fraction of the peak."""
    row = dict(rows[0])
    for part in ("train", "eval"):
        speed = statistics.median(r[f"{part}_images_per_second"] for r in rows)
        gflop_per_image = rows[0][f"{part}_gflop_per_second"] / rows[0][f"{part}_images_per_second"]
        row[f"{part}_images_per_second"] = speed
        row[f"{part}_gflop_per_second"] = speed * gflop_per_image
        row[f"{part}_fraction_of_peak"] = speed * gflop_per_image / peak_gflops
    return row


LOOP_COLUMNS = [
    ("model", "model", "s"),
    ("devices", "devices", "d"),
    ("batch", "batch_size", "d"),
    ("steps/call", "steps_per_call", "d"),
    ("bare step train img/s", "bare_train_images_per_second", ".0f"),
    ("train.py epoch train img/s", "loop_train_images_per_second", ".0f"),
    ("train loop/bare", "loop_train_ratio", ".2f"),
    ("train.py train % peak", "loop_train_fraction_of_peak", ".1%"),
    ("bare step eval img/s", "bare_eval_images_per_second", ".0f"),
    ("train.py eval img/s", "loop_eval_images_per_second", ".0f"),
    ("eval loop/bare", "loop_eval_ratio", ".2f"),
    ("train.py eval % peak", "loop_eval_fraction_of_peak", ".1%"),
]
