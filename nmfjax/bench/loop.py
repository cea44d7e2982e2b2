"""What ``train.py``'s loop adds to the bare step: an epoch of :meth:`nmfjax.trainer.Trainer.train_epoch`
and :meth:`~nmfjax.trainer.Trainer.evaluate` (the calls of ``config.steps_per_call`` steps, their keys,
the stop checks) timed next to the compiled train and eval steps alone, in one run on one trainer.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from nmfjax.bench import timing
from nmfjax.bench.throughput import synthetic_data, synthetic_train_step


def measure_loop(
    model: str,
    batch_size: int,
    peak_gflops: float,
    steps: int = 20,
    repeats: int = 3,
    iterations: int = 20,
    precision: str = "float32",
) -> dict:
    """Train and eval images/s of ``model`` at ``batch_size``: the bare compiled steps (median of
    ``steps`` calls) and ``train.py``'s epoch path over ``steps`` batches of synthetic resident images
    (median of ``repeats`` epochs after a warm-up one; no progress bar), each as GFLOP/s and as a
    fraction of ``peak_gflops``; ``loop_*_ratio`` is the epoch path's speed over the bare step's. The
    NMF products in ``precision``.
    """
    trainer, spec, (state, _, _, batch, key, totals) = synthetic_train_step(
        model, batch_size, iterations, precision=precision
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
    loop_flops = timing.uncounted_loop_flops(spec, batch_size)
    devices = trainer.mesh.size
    train_gflop = (timing.flops(train_compiled) * devices + loop_flops) / batch_size / 1e9
    eval_gflop = (timing.flops(eval_compiled) * devices + loop_flops) / batch_size / 1e9
    row: dict[str, Any] = {
        "model": model,
        "devices": devices,
        "batch_size": batch_size,
        "precision": precision,
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
