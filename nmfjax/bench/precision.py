"""The op's error when its products run in TF32 or bfloat16 instead of float32 (``--precision``)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from nmfjax import ops
from nmfjax.outputs import write_output
from nmfjax.tables import markdown_table

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
    device (on a CPU tf32 emulated, bfloat16 by :func:`nmfjax.ops.cpu_bfloat16_path`); prints the
    table and writes ``precision.json``.
    """
    device = jax.devices()[0]
    rows = op_errors(device, device, ("tf32", "bfloat16"), iterations, op_problem(positions))
    on_cpu = device.platform == "cpu"
    bfloat16_path = ops.cpu_bfloat16_path() if on_cpu else None
    print(
        f"\nRelative error against float32 on {device.device_kind}"
        + (f" (tf32 emulated, bfloat16 {bfloat16_path}; see nmfjax.ops.matmul)" if on_cpu else "")
        + ":\n"
        + markdown_table(rows, PRECISION_COLUMNS),
        flush=True,
    )
    payload = {
        "device": str(device.device_kind),
        "platform": device.platform,
        "bfloat16_path": bfloat16_path,
        "rows": rows,
    }
    write_output(output / "precision.json", json.dumps(payload, indent=2))
    print(f"\nwrote {output / 'precision.json'}")
    return rows
