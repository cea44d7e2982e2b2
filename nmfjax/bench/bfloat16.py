"""bfloat16 against float32 on a CPU (``--bfloat16``): the product peak of each, and CNMF+1x1's steps
and ``train.py``'s epoch path at each, as fractions of their own peak.

Each precision runs as ``train.py`` runs it (``kernel="auto"``: the fused C++ kernel where it takes
that precision, :func:`nmfjax.kernels.cpu_kernel_applies`, forward and one-step backward) and, where
that is the kernel, with XLA's formulas for the backward (:func:`nmfjax.kernels.xla_backward`), and
with XLA's loop and formulas for both. bfloat16 runs by the process's path
(:func:`nmfjax.ops.cpu_bfloat16_path`, native on a processor with bf16 units) and, where that is
native, forced to the float32 emulation, so that the table shows what the native products gain. The
emulation's own peak is float32's: it runs float32 products.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from nmfjax import cpu_kernel, kernels, ops, parallel
from nmfjax.bench.loop import compare_in_rounds, measure_loop
from nmfjax.bench.peak import PEAK_SIZE, cpu_name, measure_peak_gflops
from nmfjax.bench.profile import cpu_profile
from nmfjax.bench.throughput import Sizes, measure_train_and_eval
from nmfjax.outputs import write_output
from nmfjax.tables import markdown_table

MODEL = "cnmf_1x1"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: the products' ``precision``, the ``forced`` bfloat16 path (None: the process's),
    the NMF op's ``kernel`` (an :class:`nmfjax.ops.NMFOptions` value) and whether its one-step
    backward is forced to XLA's formulas (``xla_backward``).
    """

    precision: str
    forced: str | None
    kernel: str
    xla_backward: bool = False

    @property
    def path(self) -> str:
        """The bfloat16 path this row runs by."""
        return self.forced or ops.cpu_bfloat16_path()

    @property
    def runs_the_cpu_kernel(self) -> bool:
        """Whether its NMF forward is the C++ kernel."""
        return self.kernel == "auto" and kernels.cpu_kernel_applies(self.precision, jnp.float32, self.path)

    @property
    def name(self) -> str:
        """The row's name, from its products and what runs the NMF forward."""
        products = "float32" if self.precision == "float32" else f"bfloat16 {self.path}"
        if not self.runs_the_cpu_kernel:
            return f"{products}, XLA loop"
        return f"{products}, C++ kernel{' forward, XLA backward' if self.xla_backward else ''}"

    @property
    def peak(self) -> str:
        """Whose product peak is this row's own (the emulation runs float32 products)."""
        return "bfloat16" if self.precision == "bfloat16" and self.path == "native" else "float32"


def _variants() -> list[Variant]:
    """float32 and the process's bfloat16 as train.py runs them, first; then, where that is the C++
    kernel, the same with XLA's backward, and with XLA's loop; then, where bfloat16 is native, its
    emulation.
    """
    as_train_py = [Variant("float32", None, "auto"), Variant("bfloat16", None, "auto")]
    on_the_kernel = [v for v in as_train_py if v.runs_the_cpu_kernel]
    variants = as_train_py + [dataclasses.replace(v, xla_backward=True) for v in on_the_kernel]
    variants += [Variant(v.precision, None, "xla") for v in on_the_kernel]
    if ops.cpu_bfloat16_path() == "native":
        variants.append(Variant("bfloat16", "emulated", "xla"))
    return variants


def bfloat16_study(sizes: Sizes, output: pathlib.Path, rounds: int = 4) -> dict[str, Any]:
    """``--bfloat16``: prints and writes ``bfloat16.json``.

    The variants' steps and ``train.py``'s epochs are measured in ``rounds`` rounds, the variants in
    turn within each, so that all see the machine alike: images/s are the median over the rounds,
    and each "x float32" is the median over the rounds of the ratio within a round to the first row
    (float32 as ``train.py`` runs it; this machine's speed drifts between rounds by more than the
    difference measured).
    """
    devices = jax.devices()[: parallel.largest_dividing_count(jax.device_count(), (sizes.loop_batch,))]
    peaks = {
        operands: measure_peak_gflops(devices, repeats=sizes.repeats, operands=operands)
        for operands in ("float32", "bfloat16")
    }
    variants = {variant.name: variant for variant in _variants()}
    own_peak = {name: peaks[variant.peak] for name, variant in variants.items()}

    def measure(name: str) -> dict:
        variant = variants[name]
        with contextlib.ExitStack() as forcing:
            if variant.forced:
                forcing.enter_context(ops.forcing_cpu_bfloat16(variant.forced))
            if variant.xla_backward:
                forcing.enter_context(kernels.xla_backward())
            step = measure_train_and_eval(
                MODEL,
                sizes.loop_batch,
                sizes.repeats,
                own_peak[name],
                devices=len(devices),
                precision=variant.precision,
                kernel=variant.kernel,
            )
            loop = measure_loop(
                MODEL,
                sizes.loop_batch,
                own_peak[name],
                sizes.loop_steps,
                sizes.repeats,
                precision=variant.precision,
                kernel=variant.kernel,
            )
        return {**step, **{key: value for key, value in loop.items() if key.startswith("loop_")}}

    rows, measured = compare_in_rounds(list(variants), measure, rounds, own_peak)
    # Where the time goes at each precision as train.py runs it: the NMF forward iterations against the rest.
    profiles = [
        cpu_profile(MODEL, sizes.loop_batch, steps=sizes.loop_steps // 2, precision=precision, kernel="auto")
        for precision in ("float32", "bfloat16")
    ]
    results: dict[str, Any] = {
        "cpu": cpu_name(),
        "bfloat16_units": ops.cpu_has_bfloat16_units(),
        "bfloat16_path": ops.cpu_bfloat16_path(),
        "cpu_kernel_bfloat16_units": cpu_kernel.bfloat16_units(),
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
    ("kernel", "kernel", "s"),
    ("C++ kernel calls", "nmf_kernel_calls", "d"),
    ("wall ms/step", "wall_ms_per_step", ".1f"),
    ("NMF forward iterations ms", "nmf_iterations_ms", ".1f"),
    ("the rest ms", "rest_ms", ".1f"),
    ("of which C++ one-step backward ms", "nmf_backward_kernel_ms", ".1f"),
]
