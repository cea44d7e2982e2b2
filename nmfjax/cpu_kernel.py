"""The fused NMF forward pass for CPUs: all ``N`` updates of a tile of positions in one C++ call; and
the one-step backward, a tile at a time.

It computes what :func:`nmfjax.ops.nmf` does (arXiv 2503.20398, eq. 3, or eq. 6 with ``epsilon``), and
for ``gradient="approx"`` its one-step VJP (eq. 17-19, :func:`nmfjax.ops.one_step_vjp`).

XLA runs each update of :func:`nmfjax.ops.nmf` as two GEMMs over all positions
at once: every update writes ``R = h W^T`` and ``x / R`` for all positions to
memory and reads them back, and block 1's thin products (``S = 75``,
``I = 32``) run well below the core's peak. ``cpu_kernel.cc`` instead takes a
tile of positions at a time and runs all ``N`` updates on it while its ``x``,
``x / R`` and ``h`` stay in the core's caches, the two products as
register-blocked outer products over vectors of 16 floats (AVX-512, 32
registers) or 8 (AVX2, 16 registers: blocks half as tall; :func:`vector_bits`). It computes the same
``h`` to float32 round-off (the quotients by a reciprocal and one Newton
step on AVX-512, within 2 ulp).

The source ships with the package and is compiled on first use with the
machine's C++ compiler (``$CXX``, else ``c++``; ``-O3 -march=native``, so for
this processor's vector units) into ``~/.cache/nmfjax/cpu_kernel`` (or
``$NMFJAX_CACHE_DIR/cpu_kernel``), once per source, compiler, JAX and
processor; then it is registered with XLA as an FFI target. Where that fails
(no compiler), :func:`unavailable_reason` says why, and ``kernel="auto"`` takes
XLA's loop.

Under ``jit`` with the batch split over devices the call keeps that split (a
``custom_partitioning`` rule: positions sharded, ``W`` replicated), so each
device runs its own positions. Within one call, tiles are shared by the calling
thread and helpers on XLA's CPU thread pool.

The one-step backward (:func:`one_step_backward`, registered as :data:`BACKWARD_TARGET`) runs its
four products (``h W^T`` and ``(h g) W^T``, then ``dW^T`` as one product over twice a tile's
positions) and its quotients a tile at a time, in the caches, where XLA writes each of them for all
positions. ``dW`` sums over the positions: the tiles go into a fixed number of groups, each group
sums its tiles in order, and the groups are added in order, so that the result does not depend on
which thread took which tile; split over devices, each sums its own positions and the partition
rule adds the devices' sums (an all-reduce). The exact (``"unrolled"``) and ``"implicit"`` backward
passes stay XLA's.

Its products run at float32, or at ``precision="bfloat16"`` as
:func:`nmfjax.ops.matmul` does: operands rounded to bfloat16 (to nearest even),
float32 sums. On processors with AVX512-BF16 (:func:`bfloat16_units`) those run
on the dot-product instruction ``vdpbf16ps``, twice the multiply-adds of a
float32 FMA; elsewhere the rounded operands are multiplied in float32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

#: The C++ source, shipped inside the package.
SOURCE = pathlib.Path(__file__).with_name("cpu_kernel.cc")
#: The FFI target the forward kernel is registered as (CPU platform).
TARGET = "nmfjax_nmf_forward"
#: The FFI target of the one-step VJP.
BACKWARD_TARGET = "nmfjax_nmf_one_step_backward"
_SYMBOLS = {TARGET: "NmfjaxNmfForward", BACKWARD_TARGET: "NmfjaxNmfOneStepBackward"}


def compiler() -> str:
    """The C++ compiler used: ``$CXX``, else ``c++``."""
    return os.environ.get("CXX", "c++")


def _compile_flags() -> list[str]:
    machine = platform.machine().lower()
    arch = ["-mcpu=native"] if machine in ("arm64", "aarch64") else ["-march=native"]
    return ["-O3", *arch, "-std=c++17", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir()]


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the processor's name and feature flags."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def cache_dir() -> pathlib.Path:
    """Where compiled kernels are kept: ``$NMFJAX_CACHE_DIR/cpu_kernel``, else ``~/.cache/nmfjax/cpu_kernel``."""
    root = os.environ.get("NMFJAX_CACHE_DIR") or pathlib.Path.home() / ".cache" / "nmfjax"
    return pathlib.Path(root) / "cpu_kernel"


def build() -> pathlib.Path:
    """Compiles ``cpu_kernel.cc`` for this machine, or finds it compiled, and returns the library's path.

    Raises:
      RuntimeError: no compiler, or the compiler failed (its message included).
    """
    try:
        version = subprocess.run([compiler(), "--version"], capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"no C++ compiler ({compiler()!r}: {error}); set CXX to one") from error
    flags = _compile_flags()
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), version.stdout, " ".join(flags), jax.__version__, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    library = cache_dir() / f"nmf_forward_{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Compiled beside its final name and renamed: processes that build at once never load half a file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = pathlib.Path(scratch) / library.name
        result = subprocess.run(
            [compiler(), *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler()} could not compile {SOURCE.name}:\n{result.stderr.strip()}")
        os.replace(partial, library)
    return library


#: The precisions of the kernel's products (as in :func:`nmfjax.ops.matmul`).
PRECISIONS = ("float32", "bfloat16")


@functools.cache
def _load() -> ctypes.CDLL | str:
    """Builds and registers the kernel once per process: the library, or the reason it is unavailable."""
    try:
        library = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as error:
        return str(error)
    for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    library.NmfjaxBfloat16Units.restype = ctypes.c_bool
    library.NmfjaxVectorBits.restype = ctypes.c_int
    return library


def unavailable_reason() -> str | None:
    """Why the kernel cannot run in this process (e.g. no C++ compiler), or None where it can."""
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def available() -> bool:
    """Whether the kernel is built and registered (building it on the first call)."""
    return unavailable_reason() is None


def bfloat16_units() -> bool:
    """Whether the kernel's bfloat16 products run on the processor's bf16 dot-product instruction
    (AVX512-BF16); False where they are widened to float32, or the kernel is unavailable.
    """
    loaded = _load()
    return not isinstance(loaded, str) and bool(loaded.NmfjaxBfloat16Units())


def vector_bits() -> int | None:
    """The width of the kernel's vectors: 512 bits where it is compiled for AVX-512 (32 registers),
    256 elsewhere (AVX2: 16 registers, blocks of products half as tall); None where it is unavailable.
    """
    loaded = _load()
    return None if isinstance(loaded, str) else int(loaded.NmfjaxVectorBits())


def _call(x: jax.Array, w: jax.Array, iterations: int, epsilon: float | None, precision: str) -> jax.Array:
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32))(
        x,
        w,
        iterations=np.int64(iterations),
        epsilon=np.float32(0.0 if epsilon is None else epsilon),
        pure=epsilon is None,
        bfloat16=precision == "bfloat16",
    )


def _positions_sharded(mesh, arg_shapes, result_shape):
    """Keeps the split of the positions (the rows of ``x`` and ``h``); ``W`` whole on every device."""
    del result_shape
    rows = arg_shapes[0].sharding.spec[0] if len(arg_shapes[0].sharding.spec) else None
    return NamedSharding(mesh, P(rows, None)), (NamedSharding(mesh, P(rows, None)), NamedSharding(mesh, P()))


@functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
def _partitioned_call(x: jax.Array, w: jax.Array, iterations: int, epsilon: float | None, precision: str) -> jax.Array:
    return _call(x, w, iterations, epsilon, precision)


def _partition(iterations, epsilon, precision, mesh, arg_shapes, result_shape):
    result_sharding, arg_shardings = _positions_sharded(mesh, arg_shapes, result_shape)
    call = functools.partial(_call, iterations=iterations, epsilon=epsilon, precision=precision)
    return mesh, call, result_sharding, arg_shardings


def _infer(iterations, epsilon, precision, mesh, arg_shapes, result_shape):
    del iterations, epsilon, precision
    return _positions_sharded(mesh, arg_shapes, result_shape)[0]


_partitioned_call.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_infer,
    sharding_rule="p s, s i -> p i",
    need_replication_factors=("s", "i"),
)


def nmf_forward(
    x: jax.Array, w: jax.Array, iterations: int, epsilon: float | None = None, precision: str = "float32"
) -> jax.Array:
    """``h`` after ``iterations`` normalised multiplicative updates from ``h = 1/I``, as
    :func:`nmfjax.ops.nmf` computes it (paper eq. 3, or eq. 6 with ``epsilon``), by the C++ kernel.

    Args:
      x: non-negative float32 input, shape ``(P, S)`` (positions as rows).
      w: positive float32 weight, shape ``(S, I)``.
      iterations: ``N``.
      epsilon: ``None`` for the pure update, else the step size of eq. 6.
      precision: of the two products ``h W^T`` and ``(x / R) W``, one of :data:`PRECISIONS`:
        ``"bfloat16"`` rounds their operands to bfloat16 and sums in float32.

    Returns:
      ``h``, shape ``(P, I)``, float32.

    Raises:
      RuntimeError: the kernel is unavailable (:func:`unavailable_reason` says why).
      TypeError: ``x`` or ``w`` is not float32.
      ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    _check_call(precision, x, w)
    return _batchable_call(iterations, epsilon, precision)(x, w)


def _check_call(precision: str, x: jax.Array, w: jax.Array, *others: jax.Array) -> None:
    """Raises unless the kernel can take these arguments (see :func:`nmf_forward`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"the CPU kernel's products run at {PRECISIONS}, not precision={precision!r}.")
    if any(a.dtype != jnp.float32 for a in (x, w, *others)):
        raise TypeError(
            f"kernel='cpu' computes in float32, but x and w are {x.dtype} and {w.dtype}; "
            "use kernel='auto' (XLA's loop for other dtypes) or 'xla'."
        )
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU kernel is unavailable: {reason}")


def _one_call_per_batch_entry(call, outputs: int):
    """``call`` (of arrays, returning ``outputs`` arrays, or one where ``outputs`` is 1) made to run once
    per batch entry under ``vmap`` (the layers' feature groups), unbatched arguments broadcast.
    """
    call = jax.custom_batching.custom_vmap(call)

    @call.def_vmap
    def _batched(axis_size: int, in_batched: list[bool], *arguments: jax.Array):
        arguments = tuple(
            a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, batched in zip(arguments, in_batched, strict=True)
        )
        return lax.map(lambda each: call(*each), arguments), True if outputs == 1 else (True,) * outputs

    return call


@functools.cache
def _batchable_call(iterations: int, epsilon: float | None, precision: str):
    """The partitioned call, one per batch entry under ``vmap``."""
    return _one_call_per_batch_entry(lambda x, w: _partitioned_call(x, w, iterations, epsilon, precision), outputs=1)


def _backward_call(
    x: jax.Array, w: jax.Array, h: jax.Array, g: jax.Array, precision: str
) -> tuple[jax.Array, jax.Array]:
    dx, dw = jax.ffi.ffi_call(
        BACKWARD_TARGET,
        (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(w.shape, jnp.float32)),
    )(x, w, h, g, bfloat16=precision == "bfloat16")
    return dx, dw


def _backward_shardings(mesh, arg_shapes):
    """The positions' mesh axes, and the shardings of ``(x, w, h, g)`` and of ``(dx, dW)``: positions
    split as ``x``'s are, ``W`` and ``dW`` whole on every device.
    """
    rows = arg_shapes[0].sharding.spec[0] if len(arg_shapes[0].sharding.spec) else None
    split, whole = NamedSharding(mesh, P(rows, None)), NamedSharding(mesh, P())
    return rows, (split, whole, split, split), (split, whole)


@functools.partial(custom_partitioning, static_argnums=(4,))
def _partitioned_backward(x: jax.Array, w: jax.Array, h: jax.Array, g: jax.Array, precision: str):
    return _backward_call(x, w, h, g, precision)


def _partition_backward(precision, mesh, arg_shapes, result_shape):
    del result_shape
    rows, arg_shardings, result_shardings = _backward_shardings(mesh, arg_shapes)

    def call(x, w, h, g):
        dx, dw = _backward_call(x, w, h, g, precision)
        # Each device summed dW over its own positions.
        return dx, dw if rows is None else lax.psum(dw, rows)

    return mesh, call, result_shardings, arg_shardings


def _infer_backward(precision, mesh, arg_shapes, result_shape):
    del precision, result_shape
    return _backward_shardings(mesh, arg_shapes)[2]


_partitioned_backward.def_partition(
    partition=_partition_backward,
    infer_sharding_from_operands=_infer_backward,
    sharding_rule="p s, s i, p i, p i -> p s, s i",
    need_replication_factors=("s", "i"),
)


def one_step_backward(
    x: jax.Array, w: jax.Array, h: jax.Array, g: jax.Array, precision: str = "float32"
) -> tuple[jax.Array, jax.Array]:
    """The paper's one-step VJP at ``h`` (eq. 17-19), as :mod:`nmfjax.ops` computes it for
    ``gradient="approx"``, by the C++ kernel: with ``R = h W^T``,
    ``dx = (h g) W^T / R`` and ``dW^T = (h g)^T (x / R) - h^T (x / R * dx)``, summed over positions.

    Args:
      x: the op's float32 input, shape ``(P, S)``.
      w: its float32 weight, shape ``(S, I)``.
      h: the ``h`` it returned, shape ``(P, I)``.
      g: the cotangent of ``h``, shape ``(P, I)``.
      precision: of the four products, one of :data:`PRECISIONS` (as in :func:`nmf_forward`).

    Returns:
      ``(dx, dW)``, shapes ``(P, S)`` and ``(S, I)``, float32.

    Raises:
      RuntimeError: the kernel is unavailable (:func:`unavailable_reason` says why).
      TypeError: an argument is not float32.
      ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    _check_call(precision, x, w, h, g)
    return _batchable_backward(precision)(x, w, h, g)


@functools.cache
def _batchable_backward(precision: str):
    """The partitioned backward, one per batch entry under ``vmap``."""
    return _one_call_per_batch_entry(lambda x, w, h, g: _partitioned_backward(x, w, h, g, precision), outputs=2)
