"""bfloat16 against float32 on a CPU (``--bfloat16``): the product peak of each, and CNMF+1x1's steps
and ``train.py``'s epoch path at each, as fractions of their own peak.

bfloat16 runs twice: by the process's path (:func:`nmfjax.ops.cpu_bfloat16_path`, native on a
processor with bf16 units) and forced to the float32 emulation, so that the table shows what the
native products gain. The emulation's own peak is float32's: it runs float32 products.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Any

import jax

from nmfjax import ops, parallel
from nmfjax.bench.loop import compare_in_rounds, measure_loop
from nmfjax.bench.peak import PEAK_SIZE, cpu_name, measure_peak_gflops
from nmfjax.bench.profile import cpu_profile
from nmfjax.bench.throughput import Sizes, measure_train_and_eval
from nmfjax.outputs import write_output
from nmfjax.tables import markdown_table

MODEL = "cnmf_1x1"


def _variants() -> list[tuple[str, str, str | None]]:
    """(name, precision, forced bfloat16 path) of each row: float32, the process's bfloat16, the emulation."""
    variants: list[tuple[str, str, str | None]] = [("float32", "float32", None)]
    variants.append((f"bfloat16 {ops.cpu_bfloat16_path()}", "bfloat16", None))
    if ops.cpu_bfloat16_path() == "native":
        variants.append(("bfloat16 emulated", "bfloat16", "emulated"))
    return variants


def bfloat16_study(sizes: Sizes, output: pathlib.Path, rounds: int = 4) -> dict[str, Any]:
    """``--bfloat16``: prints and writes ``bfloat16.json``.

    The variants' steps and ``train.py``'s epochs are measured in ``rounds`` rounds, the variants in
    turn within each, so that all see the machine alike: images/s are the median over the rounds,
    and each "x float32" is the median over the rounds of the ratio within a round (this machine's
    speed drifts between rounds by more than the difference measured).
    """
    devices = jax.devices()[: parallel.largest_dividing_count(jax.device_count(), (sizes.loop_batch,))]
    peaks = {
        operands: measure_peak_gflops(devices, repeats=sizes.repeats, operands=operands)
        for operands in ("float32", "bfloat16")
    }
    variants = _variants()
    own_peak = {
        name: peaks["float32" if name in ("float32", "bfloat16 emulated") else "bfloat16"] for name, _, _ in variants
    }

    def measure(name: str) -> dict:
        precision, forced = {variant: (precision, forced) for variant, precision, forced in variants}[name]
        with ops.forcing_cpu_bfloat16(forced) if forced else contextlib.nullcontext():
            # XLA's loop at every precision: the C++ kernel (train.py's float32 default) has no bf16 path.
            step = measure_train_and_eval(
                MODEL, sizes.loop_batch, sizes.repeats, own_peak[name], devices=len(devices), precision=precision
            )
            loop = measure_loop(
                MODEL,
                sizes.loop_batch,
                own_peak[name],
                sizes.loop_steps,
                sizes.repeats,
                precision=precision,
                kernel="xla",
            )
        return {**step, **{key: value for key, value in loop.items() if key.startswith("loop_")}}

    rows, measured = compare_in_rounds([name for name, _, _ in variants], measure, rounds, own_peak)
    # Where the time goes at each precision: the NMF forward iterations against the rest of the step.
    profiles = [
        cpu_profile(MODEL, sizes.loop_batch, steps=sizes.loop_steps // 2, precision=precision, kernel="xla")
        for precision in ("float32", "bfloat16")
    ]
    results: dict[str, Any] = {
        "cpu": cpu_name(),
        "bfloat16_units": ops.cpu_has_bfloat16_units(),
        "bfloat16_path": ops.cpu_bfloat16_path(),
        "jax": jax.__version__,
        "devices": len(devices),
        "batch_size": sizes.loop_batch,
        "rounds": rounds,
        "peak_size": PEAK_SIZE,
        "peak_gflops": peaks,
        "rows": rows,
        "profiles": profiles,
        "measured": measured,
    }
    print(
        f"{results['cpu']} (bf16 units: {'yes' if results['bfloat16_units'] else 'no'}), {len(devices)} device(s): "
        f"peak {peaks['float32']:.0f} GFLOP/s float32, {peaks['bfloat16']:.0f} bfloat16 "
        f"({PEAK_SIZE}x{PEAK_SIZE} products)\n" + markdown_table(rows, BFLOAT16_COLUMNS)
    )
    print("\nWhere a train step's time goes:\n" + markdown_table(profiles, BFLOAT16_PROFILE_COLUMNS))
    write_output(output / "bfloat16.json", json.dumps(results, indent=2))
    print(f"wrote {output / 'bfloat16.json'}")
    return results


BFLOAT16_COLUMNS = [
    ("products", "variant", "s"),
    ("peak GFLOP/s", "peak_gflops", ".0f"),
    ("train img/s", "train_images_per_second", ".0f"),
    ("train % peak", "train_fraction_of_peak", ".1%"),
    ("eval img/s", "eval_images_per_second", ".0f"),
    ("eval % peak", "eval_fraction_of_peak", ".1%"),
    ("train x float32", "train_speedup", ".2f"),
    ("eval x float32", "eval_speedup", ".2f"),
    ("train.py train img/s", "loop_train_images_per_second", ".0f"),
    ("train.py eval img/s", "loop_eval_images_per_second", ".0f"),
    ("train.py train x float32", "loop_train_speedup", ".2f"),
    ("train.py eval x float32", "loop_eval_speedup", ".2f"),
]
BFLOAT16_PROFILE_COLUMNS = [
    ("precision", "precision", "s"),
    ("wall ms/step", "wall_ms_per_step", ".1f"),
    ("NMF forward iterations ms", "nmf_iterations_ms", ".1f"),
    ("the rest ms", "rest_ms", ".1f"),
    ("forward products", "nmf_loop_products", "d"),
    ("of them on bf16 operands", "bfloat16_loop_products", "d"),
]
