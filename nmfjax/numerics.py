"""What the NMF op (:mod:`nmfjax.ops`) and its fused kernel (:mod:`nmfjax.kernels`) compute alike.

The guards of the authors' code that keep sums and reconstructions away from
zero, the lower precisions of the products, and :func:`retracing_with`, which
both modules use to change how the programs traced inside it compute. The op
dispatches to the kernel; neither reaches into the other's private names.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
from jax import lax

#: Added to a sum before dividing by it (the L1 normalisation of ``x`` and of ``h``).
NORMALIZE_EPS = 1e-19
#: Added to the reconstruction ``W h`` before ``x`` is divided by it (paper eq. 6).
RECONSTRUCTION_EPS = 1e-20

#: For each lower precision of the products, the dot algorithm an accelerator runs (operands
#: rounded, float32 sums) and the mantissa bits of its operands, which a CPU emulates by rounding
#: them before a float32 product.
LOWER_PRECISIONS = {
    "tf32": (lax.DotAlgorithmPreset.TF32_TF32_F32, 10),
    "bfloat16": (lax.DotAlgorithmPreset.BF16_BF16_F32, 7),
}


@contextlib.contextmanager
def retracing_with(variable: contextvars.ContextVar[Any], value: Any) -> Iterator[None]:
    """``variable`` holds ``value`` inside; JAX's caches are cleared on entry and exit, so that a
    function jitted before is traced again with the value (it would otherwise keep the one it was
    traced with).
    """
    token = variable.set(value)
    jax.clear_caches()
    try:
        yield
    finally:
        variable.reset(token)
        jax.clear_caches()
