"""A fused NMF forward pass: all ``N`` multiplicative updates in one Pallas kernel (arXiv 2503.20398, eq. 3/6).

XLA runs each of the ``N`` updates of :func:`nmfjax.ops.nmf` as separate
kernels (two matrix products, a division, a normalisation), inside a while
loop whose condition goes to the host on a GPU. :func:`nmf_forward` instead
launches one kernel per call: each program takes a tile of positions, keeps
its ``h`` on chip for all ``N`` updates and streams ``x`` and ``W`` through
in chunks of the input features.

The shapes it takes: any ``S`` and ``I`` (Triton wants powers of two, so both
are zero-padded to the next power of two, at least 16; a padded feature has
``x = 0`` and ``W = 0`` and adds nothing to ``f``, a padded hidden unit starts
at ``h = 0`` and stays there) and any number of positions (padded to a
multiple of the tile). It computes only the forward ``h``; the backward passes
of :mod:`nmfjax.ops` are formulas of ``x``, ``W`` and that ``h`` and stay in XLA.

Where it runs (``NMFOptions.kernel``): ``"pallas"`` lowers to Triton on an
NVIDIA GPU and runs in Pallas's interpret mode on other platforms (slow, but
the same arithmetic: for tests); ``"auto"`` takes Triton on a GPU and the XLA
loop elsewhere. The choice is made when the program is lowered for its platform
(``lax.platform_dependent``), so an exported program carries both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nmfjax import ops
from nmfjax.ops import _LOWER_PRECISIONS, _NORMALIZE_EPS, _RECONSTRUCTION_EPS

#: The custom call a Pallas kernel lowers to for NVIDIA GPUs (jax.export names it).
TRITON_CALL_TARGET = "__gpu$xla.gpu.triton"

#: Positions per program, the rows of each on-chip matrix product (Triton's dots need at least 16).
POSITION_TILE = 32
#: Input features per chunk of the sum over ``S`` (bounds the registers a program needs).
FEATURE_CHUNK = 128
_MIN_DOT_SIZE = 16

# Each precision of nmfjax.ops.matmul as a dot algorithm (Triton) and as the operands' mantissa bits
# (the interpret mode's emulation on a CPU, as nmfjax.ops.matmul does it; None: float32 as it is).
_ALGORITHMS = {"float32": (lax.DotAlgorithmPreset.F32_F32_F32, None), **_LOWER_PRECISIONS}


def padded_size(size: int) -> int:
    """The size Triton takes for a dimension of ``size``: the next power of two, at least 16."""
    return max(_MIN_DOT_SIZE, pl.next_power_of_2(size))


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], precision: str, interpret: bool) -> jax.Array:
    """``a`` and ``b`` contracted over axes ``contract``, with ``precision``'s operands and float32 sums."""
    algorithm, mantissa_bits = _ALGORITHMS[precision]
    dimensions = (((contract[0],), (contract[1],)), ((), ()))
    if not interpret:
        return lax.dot_general(a, b, dimensions, precision=algorithm, preferred_element_type=a.dtype)
    if mantissa_bits is not None:
        rounded = functools.partial(lax.reduce_precision, exponent_bits=8, mantissa_bits=mantissa_bits)
        a, b = rounded(a), rounded(b)
    return lax.dot_general(a, b, dimensions, precision=lax.Precision.HIGHEST)


def _nmf_kernel(
    x_ref,
    w_ref,
    h_ref,
    *,
    iterations: int,
    epsilon: float | None,
    num_hidden: int,
    precision: str,
    interpret: bool,
) -> None:
    """One tile: ``x_ref`` ``(POSITION_TILE, S_pad)``, ``w_ref`` ``(S_pad, I_pad)``, ``h_ref`` the tile's ``h``."""
    tile, padded_hidden = h_ref.shape
    chunk = min(FEATURE_CHUNK, x_ref.shape[1])
    num_chunks = x_ref.shape[1] // chunk
    dtype = h_ref.dtype
    hidden = lax.broadcasted_iota(jnp.int32, (tile, padded_hidden), 1)
    h = jnp.where(hidden < num_hidden, 1.0 / num_hidden, 0.0).astype(dtype)

    def update(_, h: jax.Array) -> jax.Array:
        def add_chunk(index, factor: jax.Array) -> jax.Array:
            features = pl.ds(pl.multiple_of(index * chunk, chunk), chunk)
            w = w_ref[features, :]  # (chunk, I_pad)
            reconstruction = _dot(h, w, (1, 1), precision, interpret) + _RECONSTRUCTION_EPS  # W h: (tile, chunk)
            ratio = x_ref[:, features] / reconstruction
            return factor + _dot(ratio, w, (1, 0), precision, interpret)  # W^T (x / R): (tile, I_pad)

        factor = lax.fori_loop(0, num_chunks, add_chunk, jnp.zeros_like(h))
        h = h * factor if epsilon is None else h * (1 + epsilon * factor)
        return h / (jnp.sum(h, axis=1, keepdims=True) + _NORMALIZE_EPS)

    h_ref[...] = lax.fori_loop(0, iterations, update, h)


def nmf_forward(
    x: jax.Array,
    w: jax.Array,
    iterations: int,
    epsilon: float | None = None,
    precision: str = "float32",
    *,
    interpret: bool = False,
) -> jax.Array:
    """``h`` after ``iterations`` normalised multiplicative updates from ``h = 1/I`` (paper eq. 3, or eq. 6
    with ``epsilon``), as :func:`nmfjax.ops.nmf` computes it, in one kernel launch.

    Args:
      x: non-negative input, shape ``(P, S)`` (positions as rows).
      w: positive weight, shape ``(S, I)``.
      iterations: ``N``.
      epsilon: ``None`` for the pure update, else the step size of eq. 6.
      precision: of the products, as in :func:`nmfjax.ops.matmul`.
      interpret: run in Pallas's interpret mode (any platform) instead of Triton (NVIDIA GPUs).

    Returns:
      ``h``, shape ``(P, I)``, in the dtype of ``x``.
    """
    positions, features = x.shape
    num_hidden = w.shape[1]
    padded_positions = pl.cdiv(positions, POSITION_TILE) * POSITION_TILE
    padded_features, padded_hidden = padded_size(features), padded_size(num_hidden)
    x = jnp.pad(x, ((0, padded_positions - positions), (0, padded_features - features)))
    w = jnp.pad(w.astype(x.dtype), ((0, padded_features - features), (0, padded_hidden - num_hidden)))
    kernel = functools.partial(
        _nmf_kernel,
        iterations=iterations,
        epsilon=epsilon,
        num_hidden=num_hidden,
        precision=precision,
        interpret=interpret,
    )
    h = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_positions, padded_hidden), x.dtype),
        grid=(padded_positions // POSITION_TILE,),
        in_specs=[
            pl.BlockSpec((POSITION_TILE, padded_features), lambda tile: (tile, 0)),
            pl.BlockSpec((padded_features, padded_hidden), lambda tile: (0, 0)),
        ],
        out_specs=pl.BlockSpec((POSITION_TILE, padded_hidden), lambda tile: (tile, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="nmf_forward",
    )(x, w)
    return h[:positions, :num_hidden]


def forward(x: jax.Array, w: jax.Array, options: ops.NMFOptions, xla) -> jax.Array:
    """The forward ``h`` by ``options.kernel`` (``"pallas"`` or ``"auto"``; see the module docstring);
    ``xla(x, w)`` is the XLA loop that ``"auto"`` takes off a GPU.
    """
    fused = functools.partial(
        nmf_forward, iterations=options.iterations, epsilon=options.epsilon, precision=options.precision
    )
    off_gpu = functools.partial(fused, interpret=True) if options.kernel == "pallas" else xla
    return lax.platform_dependent(x, w, cuda=fused, default=off_gpu)
