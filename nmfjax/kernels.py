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

How a call is cut into programs (:class:`LaunchParameters`) follows one rule,
:func:`launch_parameters`, from the call's shape, its precision and the GPU
(:func:`gpu_target`: the local one, or :data:`H100` when a program is exported
on a machine without one). ``python -m nmfjax.bench --triton`` compiles every
NMF layer of the paper's networks with it for sm_90 and sm_80 and reports
registers, spills and the product instructions (docs/performance.md).

Where it runs (``NMFOptions.kernel``): ``"pallas"`` lowers to Triton on an
NVIDIA GPU and runs in Pallas's interpret mode on other platforms (slow, but
the same arithmetic: for tests); ``"auto"`` takes Triton on a GPU where the
call's programs fill the SMs (:func:`fills_gpu`), the C++ kernel of
:mod:`nmfjax.cpu_kernel` on a CPU with AVX-512 (float32, and bfloat16 on bf16 units), and
XLA's loop elsewhere (a call of a few programs leaves most of the GPU idle,
while XLA's products spread over it). :func:`forward` makes that choice; the platform's branch is taken
when the program is lowered for its platform (``lax.platform_dependent``), so
an exported program carries each.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nmfjax import cpu_kernel
from nmfjax.numerics import LOWER_PRECISIONS, NORMALIZE_EPS, RECONSTRUCTION_EPS, retracing_with

#: The custom call a Pallas kernel lowers to for NVIDIA GPUs (jax.export names it).
TRITON_CALL_TARGET = "__gpu$xla.gpu.triton"

_MIN_DOT_SIZE = 16


@dataclasses.dataclass(frozen=True)
class LaunchParameters:
    """How one kernel call is cut into programs.

    Attributes:
      position_tile: positions per program, the rows of each on-chip product
        (a power of two, at least 16: Triton's dots need 16).
      feature_chunk: input features per step of the sum over ``S`` (a power of
        two, at least 16, at most the padded ``S``); bounds the registers.
      num_warps: warps per program.
      num_stages: software-pipelining stages of Triton's loops.
    """

    position_tile: int = 32
    feature_chunk: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def grid(self, positions: int) -> int:
        """Programs for ``positions`` rows."""
        return pl.cdiv(positions, self.position_tile)


# Each precision of nmfjax.ops.matmul as a dot algorithm (Triton) and as the operands' mantissa bits
# (the interpret mode's emulation on a CPU, as nmfjax.ops.matmul does it; None: float32 as it is).
_ALGORITHMS = {"float32": (lax.DotAlgorithmPreset.F32_F32_F32, None), **LOWER_PRECISIONS}


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
    chunk: int,
    interpret: bool,
) -> None:
    """One tile: ``x_ref`` ``(position_tile, S_pad)``, ``w_ref`` ``(S_pad, I_pad)``, ``h_ref`` the tile's ``h``."""
    tile, padded_hidden = h_ref.shape
    num_chunks = x_ref.shape[1] // chunk
    dtype = h_ref.dtype
    hidden = lax.broadcasted_iota(jnp.int32, (tile, padded_hidden), 1)
    h = jnp.where(hidden < num_hidden, 1.0 / num_hidden, 0.0).astype(dtype)

    def update(_, h: jax.Array) -> jax.Array:
        def add_chunk(index, factor: jax.Array) -> jax.Array:
            features = pl.ds(pl.multiple_of(index * chunk, chunk), chunk)
            w = w_ref[features, :]  # (chunk, I_pad)
            reconstruction = _dot(h, w, (1, 1), precision, interpret) + RECONSTRUCTION_EPS  # W h: (tile, chunk)
            ratio = x_ref[:, features] / reconstruction
            return factor + _dot(ratio, w, (1, 0), precision, interpret)  # W^T (x / R): (tile, I_pad)

        factor = lax.fori_loop(0, num_chunks, add_chunk, jnp.zeros_like(h))
        h = h * factor if epsilon is None else h * (1 + epsilon * factor)
        return h / (jnp.sum(h, axis=1, keepdims=True) + NORMALIZE_EPS)

    h_ref[...] = lax.fori_loop(0, iterations, update, h)


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """What the launch rule plans for: a GPU's compute capability and its count of SMs."""

    capability: int
    sm_count: int


#: The GPU planned for where none is attached (a program exported for CUDA on a CPU), an H100 SXM.
H100 = GpuTarget(capability=90, sm_count=132)
#: An A100 (SXM or PCIe), for programs exported for sm_80.
A100 = GpuTarget(capability=80, sm_count=108)

_planned_target: contextvars.ContextVar[GpuTarget | None] = contextvars.ContextVar("planned_target", default=None)


@contextlib.contextmanager
def planning_for(target: GpuTarget) -> Iterator[None]:
    """Programs traced inside plan their kernel launches for ``target`` (e.g. to export for a GPU one has not).

    JAX's caches are cleared on entry and exit: a jitted function traced before
    (such as :func:`nmfjax.ops.nmf`) would otherwise keep its earlier plan.
    """
    with retracing_with(_planned_target, target):
        yield


def gpu_target() -> GpuTarget:
    """The GPU launches are planned for: :func:`planning_for`'s, else the first local NVIDIA GPU's,
    else :data:`H100`.
    """
    planned = _planned_target.get()
    if planned is not None:
        return planned
    for device in jax.devices():
        capability, sm_count = getattr(device, "compute_capability", None), getattr(device, "core_count", None)
        if device.platform == "gpu" and capability is not None and sm_count is not None:
            major, minor = str(capability).split(".")[:2]
            return GpuTarget(capability=int(major) * 10 + int(minor), sm_count=int(sm_count))
    return H100


#: Warps per program, so that two warpgroups share each tile's products and accumulators.
NUM_WARPS = 8
#: Triton's software pipelining of the feature loop; two stages spill a few bytes on some shapes.
NUM_STAGES = 1
#: Float32 values per thread the rule lets a program's ``h``, ``f``, ``W h`` chunk and ``W`` chunk take
#: (checked free of spills on sm_90 and sm_80 by ``python -m nmfjax.bench --triton``).
VALUES_PER_THREAD = 48
_POSITION_TILES = (128, 64, 32, 16)
_MAX_FEATURE_CHUNK = 128
# Hopper's wgmma multiplies 64-row tiles per warpgroup; smaller tiles fall back to mma.sync.
_WGMMA_CAPABILITY, _WGMMA_MIN_TILE = 90, 64


def launch_parameters(
    positions: int, features: int, hidden: int, precision: str, target: GpuTarget = H100
) -> LaunchParameters:
    """The launch parameters for one call on ``x`` ``(positions, features)`` and ``W`` ``(features, hidden)``.

    The rule:

    1. Tiles a product may take: 16 to 128 positions; with ``"tf32"`` or
       ``"bfloat16"`` on sm_90 or later, 64 or 128, so that the products run on
       ``wgmma``.
    2. The largest of those whose grid reaches the target's SM count, so that
       each program reuses ``W`` over as many positions as can still fill the
       GPU; if none does, the smallest (the most programs), and
       :func:`fills_gpu` is false: ``kernel="auto"`` then takes XLA's loop.
    3. :data:`NUM_WARPS` warps and :data:`NUM_STAGES` stage.
    4. The largest chunk of the padded ``S`` (16 to 128) whose values per
       thread stay within :data:`VALUES_PER_THREAD`:
       ``(2 * tile * I_pad + tile * chunk + chunk * I_pad) / (32 * warps)``
       for ``h``, ``f``, the chunk of ``W h`` and the chunk of ``W``.
    """
    tiles: tuple[int, ...] = _POSITION_TILES
    if precision != "float32" and target.capability >= _WGMMA_CAPABILITY:
        tiles = tuple(tile for tile in tiles if tile >= _WGMMA_MIN_TILE)
    filling = [tile for tile in tiles if pl.cdiv(positions, tile) >= target.sm_count]
    tile = filling[0] if filling else tiles[-1]
    padded_features, padded_hidden = padded_size(features), padded_size(hidden)
    threads = 32 * NUM_WARPS
    chunk = min(_MAX_FEATURE_CHUNK, padded_features)
    while chunk > _MIN_DOT_SIZE and (2 * tile * padded_hidden + chunk * (tile + padded_hidden)) > (
        VALUES_PER_THREAD * threads
    ):
        chunk //= 2
    return LaunchParameters(position_tile=tile, feature_chunk=chunk, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def fills_gpu(positions: int, parameters: LaunchParameters, target: GpuTarget) -> bool:
    """Whether a call's grid gives every SM of ``target`` a program."""
    return parameters.grid(positions) >= target.sm_count


def nmf_forward(
    x: jax.Array,
    w: jax.Array,
    iterations: int,
    epsilon: float | None = None,
    precision: str = "float32",
    *,
    parameters: LaunchParameters | None = None,
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
      parameters: how the call is cut into programs; ``None``: :func:`launch_parameters`'s choice
        for this shape on :func:`gpu_target`.
      interpret: run in Pallas's interpret mode (any platform) instead of Triton (NVIDIA GPUs).

    Returns:
      ``h``, shape ``(P, I)``, in the dtype of ``x``.
    """
    positions, features = x.shape
    num_hidden = w.shape[1]
    if parameters is None:
        parameters = launch_parameters(positions, features, num_hidden, precision, gpu_target())
    tile = parameters.position_tile
    padded_positions = parameters.grid(positions) * tile
    padded_features, padded_hidden = padded_size(features), padded_size(num_hidden)
    x = jnp.pad(x, ((0, padded_positions - positions), (0, padded_features - features)))
    w = jnp.pad(w.astype(x.dtype), ((0, padded_features - features), (0, padded_hidden - num_hidden)))
    kernel = functools.partial(
        _nmf_kernel,
        iterations=iterations,
        epsilon=epsilon,
        num_hidden=num_hidden,
        precision=precision,
        chunk=min(parameters.feature_chunk, padded_features),
        interpret=interpret,
    )
    h = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_positions, padded_hidden), x.dtype),
        grid=(parameters.grid(positions),),
        in_specs=[
            pl.BlockSpec((tile, padded_features), lambda program: (program, 0)),
            pl.BlockSpec((padded_features, padded_hidden), lambda program: (0, 0)),
        ],
        out_specs=pl.BlockSpec((tile, padded_hidden), lambda program: (program, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=parameters.num_warps, num_stages=parameters.num_stages),
        interpret=interpret,
        # (the launch parameters in the name: profiles and the compile check read them there)
        name=f"nmf_forward_tile{tile}_chunk{min(parameters.feature_chunk, padded_features)}",
    )(x, w)
    return h[:positions, :num_hidden]


def forward(
    x: jax.Array,
    w: jax.Array,
    *,
    iterations: int,
    epsilon: float | None,
    precision: str,
    kernel: str,
    xla: Callable[[jax.Array, jax.Array], jax.Array],
    cpu_bfloat16_path: str,
) -> jax.Array:
    """The forward ``h`` of :func:`nmfjax.ops.nmf` with ``NMFOptions(kernel=...)`` ``"pallas"``, ``"cpu"``
    or ``"auto"``; ``iterations``, ``epsilon`` and ``precision`` are the op's, ``xla(x, w)`` its XLA loop,
    ``cpu_bfloat16_path`` the process's :func:`nmfjax.ops.cpu_bfloat16_path`.

    - ``"pallas"``: Triton on an NVIDIA GPU, Pallas's interpret mode elsewhere (see the module docstring).
    - ``"cpu"``: :mod:`nmfjax.cpu_kernel` on a CPU (float32 or bfloat16 products), XLA's loop elsewhere.
    - ``"auto"``: Triton on an NVIDIA GPU where its grid fills the SMs (:func:`fills_gpu`), the CPU
      kernel on a CPU where :func:`cpu_kernel_applies`, else XLA's loop.

    The platform's branch is chosen where the program is lowered (``lax.platform_dependent``).
    """
    positions, features = x.shape
    branches: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {}
    default = xla
    if kernel in ("pallas", "auto"):
        target = gpu_target()
        parameters = launch_parameters(positions, features, w.shape[1], precision, target)
        fused = functools.partial(
            nmf_forward, iterations=iterations, epsilon=epsilon, precision=precision, parameters=parameters
        )
        if kernel == "pallas":
            branches["cuda"], default = fused, functools.partial(fused, interpret=True)
        elif fills_gpu(positions, parameters, target):
            branches["cuda"] = fused
    if kernel == "cpu" or (kernel == "auto" and cpu_kernel_applies(precision, x.dtype, cpu_bfloat16_path)):
        branches["cpu"] = functools.partial(
            cpu_kernel.nmf_forward, iterations=iterations, epsilon=epsilon, precision=precision
        )
    if not branches:
        return default(x, w)
    return lax.platform_dependent(x, w, **branches, default=default)


_xla_backward: contextvars.ContextVar[bool] = contextvars.ContextVar("xla_backward", default=False)


@contextlib.contextmanager
def xla_backward() -> Iterator[None]:
    """Programs traced inside run the one-step backward by XLA's formulas where :func:`one_step_backward`
    would take the C++ kernel (to time one against the other). JAX's caches are cleared on entry and exit.
    """
    with retracing_with(_xla_backward, True):
        yield


def one_step_backward(
    x: jax.Array,
    w: jax.Array,
    h: jax.Array,
    g: jax.Array,
    *,
    precision: str,
    kernel: str,
    xla: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    cpu_bfloat16_path: str,
) -> tuple[jax.Array, jax.Array]:
    """The one-step VJP ``(dx, dW)`` of :func:`nmfjax.ops.nmf` at ``h`` with cotangent ``g``:
    :func:`nmfjax.cpu_kernel.one_step_backward` on a CPU where :func:`forward` takes the C++ kernel
    (``kernel`` ``"cpu"``, or ``"auto"`` where :func:`cpu_kernel_applies`), else ``xla(x, w, h, g)``
    (on a GPU too: there the four products are XLA's GEMMs at full speed).
    """
    if _xla_backward.get():
        return xla(x, w, h, g)
    if kernel == "cpu" or (kernel == "auto" and cpu_kernel_applies(precision, x.dtype, cpu_bfloat16_path)):
        return lax.platform_dependent(
            x, w, h, g, cpu=functools.partial(cpu_kernel.one_step_backward, precision=precision), default=xla
        )
    return xla(x, w, h, g)


#: The vector width at which the C++ kernel outruns XLA's loop (AVX-512); "auto" takes it only there.
AVX512_BITS = 512


def cpu_kernel_applies(precision: str, dtype: jax.typing.DTypeLike, cpu_bfloat16_path: str) -> bool:
    """Whether ``kernel="auto"`` takes :mod:`nmfjax.cpu_kernel` on a CPU: operands of ``dtype`` float32,
    the kernel built for this machine with AVX-512's vectors (:func:`nmfjax.cpu_kernel.vector_bits`;
    with AVX2's it computes the same but trains and evaluates slower than XLA's loop,
    docs/performance.md), and float32 products, or bfloat16 ones where the process runs them on the
    bf16 units (``cpu_bfloat16_path`` ``"native"``) and so does the kernel
    (:func:`nmfjax.cpu_kernel.bfloat16_units`); the emulation stays XLA's loop.
    """
    if jnp.dtype(dtype) != jnp.float32 or cpu_kernel.vector_bits() != AVX512_BITS:
        return False
    if precision == "float32":
        return True
    return precision == "bfloat16" and cpu_bfloat16_path == "native" and cpu_kernel.bfloat16_units()
