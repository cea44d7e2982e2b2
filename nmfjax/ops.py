"""The NMF op of deep NMF networks as pure JAX functions (arXiv 2503.20398, section 2.3).

Notation: ``S`` input features of an NMF unit, ``I`` hidden units, ``N``
iterations. Leading batch dimensions of ``x`` are independent NMF problems
("positions") that share the weight ``w``.

The forward pass iterates the multiplicative update

    R = W h + 1e-20,   f = W^T (x / R),
    h <- normalise(h * f)               (pure mode, ``epsilon=None``)
    h <- normalise(h * (1 + eps * f))   (``epsilon=eps``)

``N`` times from ``h = 1/I``. Three backward passes are available:

* ``"approx"``: the one-step formula of the paper (eq. 18/19), evaluated once at
  the final ``h``; keeps only ``x``, ``W`` and ``h``.
* ``"unrolled"``: reverse-mode autodiff through all ``N`` iterations; memory
  grows with ``N``.
* ``"implicit"``: implicit-function-theorem gradient of the fixed point,
  solving the adjoint system by a fixed number of iterations; memory
  independent of ``N``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import numbers
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import checkify

from nmfjax import cpu_kernel, kernels
from nmfjax.numerics import LOWER_PRECISIONS, NORMALIZE_EPS, RECONSTRUCTION_EPS, retracing_with
from nmfjax.validation import check_positive_int

GRADIENTS = ("approx", "unrolled", "implicit")
LEARNING_RULES = ("backprop", "local_kl", "local_mse")
PRECISIONS = ("float32", "tf32", "bfloat16")
KERNELS = ("xla", "pallas", "cpu", "auto")

#: How ``precision="bfloat16"`` may run on a CPU: ``"native"``, bfloat16 operands and float32 sums
#: on the processor's bf16 units; ``"emulated"``, operands rounded to bfloat16 and a float32 product.
CPU_BFLOAT16_PATHS = ("native", "emulated")
#: The environment variable that picks a path of :data:`CPU_BFLOAT16_PATHS` over the processor's features.
CPU_BFLOAT16_ENV = "NMFJAX_CPU_BFLOAT16"
# The x86 features (Linux's /proc/cpuinfo flags) of bfloat16 products with float32 sums: AVX512-BF16
# (Intel since Cooper Lake, AMD since Zen 4) and AMX-BF16 (Intel since Sapphire Rapids).
_BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

_forced_cpu_bfloat16: contextvars.ContextVar[str | None] = contextvars.ContextVar("forced_cpu_bfloat16", default=None)

# What the custom VJPs keep from the forward pass: (x, w, h).
Residuals = tuple[jax.Array, jax.Array, jax.Array]


@jax.custom_jvp
def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator`` whose derivative stays finite where the numerator is 0.

    Autodiff of ``x / y`` forms ``x * y**-2`` for the denominator's tangent; with
    the guards' tiny denominators (an all-zero patch gives ``h = 0`` and
    ``R = 1e-20``) ``y**-2`` overflows float32 and ``0 * inf`` is NaN. The same
    derivative written as ``(dx - x * (dy / y)) / y`` is exact and finite there.
    """
    return numerator / denominator


@safe_divide.defjvp
def _safe_divide_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    numerator, denominator = primals
    numerator_tangent, denominator_tangent = tangents
    # Written with the numerator rather than the quotient: the residuals are then those of a plain
    # division (the quotient as a residual costs ~10 MB more in the CNMF+1x1 train step).
    return numerator / denominator, (numerator_tangent - numerator * (denominator_tangent / denominator)) / denominator


def matmul(a: jax.Array, b: jax.Array, precision: str = "float32") -> jax.Array:
    """``a @ b`` as every product of the NMF op runs it: operands in ``precision``, sums in float32.

    ``"float32"``: full float32 on every platform (``lax.Precision.HIGHEST``: a
    GPU's default for float32 products may be TF32). ``"tf32"`` (10 mantissa
    bits) and ``"bfloat16"`` (7): on an accelerator the dot algorithm
    ``TF32_TF32_F32`` or ``BF16_BF16_F32`` (tensor cores). On a CPU, whose XLA
    ignores those algorithms, ``"bfloat16"`` casts both operands to bfloat16
    and sums in float32 where the processor has bf16 units
    (:func:`cpu_bfloat16_path`); elsewhere, and always for ``"tf32"`` (no CPU has
    TF32 units), an emulation rounds both operands to that mantissa
    (``lax.reduce_precision``) before a float32 product: the same numbers, at
    float32's speed. The choice between CPU and accelerator is made when the
    program is lowered for its platform (``lax.platform_dependent``).

    Args:
      a: ``(..., M, K)``.
      b: ``(K, N)`` (or batched as ``jnp.matmul`` allows).
      precision: ``"float32"``, ``"tf32"`` or ``"bfloat16"``.

    Returns:
      ``(..., M, N)`` in the operands' dtype.
    """
    if precision == "float32":
        return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)
    algorithm, mantissa_bits = LOWER_PRECISIONS[precision]

    def emulated(a: jax.Array, b: jax.Array) -> jax.Array:
        rounded = functools.partial(lax.reduce_precision, exponent_bits=8, mantissa_bits=mantissa_bits)
        return jnp.matmul(rounded(a), rounded(b), precision=lax.Precision.HIGHEST)

    def on_bfloat16_units(a: jax.Array, b: jax.Array) -> jax.Array:
        # The cast rounds to nearest even, as the emulation does; bf16 x bf16 products are exact in float32.
        return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32).astype(
            a.dtype
        )

    def native(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.matmul(a, b, precision=algorithm, preferred_element_type=a.dtype)

    on_cpu = on_bfloat16_units if precision == "bfloat16" and cpu_bfloat16_path() == "native" else emulated
    return lax.platform_dependent(a, b, cpu=on_cpu, default=native)


@functools.cache
def _cpu_bfloat16_default() -> str:
    """The process's path for bfloat16 products on a CPU: :data:`CPU_BFLOAT16_ENV`, else the processor's flags."""
    chosen = os.environ.get(CPU_BFLOAT16_ENV)
    if chosen is not None:
        if chosen not in CPU_BFLOAT16_PATHS:
            raise ValueError(f"{CPU_BFLOAT16_ENV} must be one of {CPU_BFLOAT16_PATHS}, got {chosen!r}.")
        return chosen
    return "native" if cpu_has_bfloat16_units() else "emulated"


def cpu_has_bfloat16_units(cpuinfo: str | None = None) -> bool:
    """Whether the processor multiplies bfloat16 with float32 sums in hardware: the ``flags`` of Linux's
    /proc/cpuinfo (or of ``cpuinfo``, its text) list ``avx512_bf16`` or ``amx_bf16``. False where
    there is no such file (not Linux).
    """
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {
        flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()
    }
    return bool(flags & _BFLOAT16_CPU_FLAGS)


def cpu_bfloat16_path() -> str:
    """How ``precision="bfloat16"`` runs on a CPU in this process, one of :data:`CPU_BFLOAT16_PATHS`.

    ``"native"`` where the processor has bfloat16 units (Linux's /proc/cpuinfo
    lists ``avx512_bf16`` or ``amx_bf16``), else ``"emulated"``; decided once per
    process. :data:`CPU_BFLOAT16_ENV` (``native`` or ``emulated``) overrides the
    flags, and :func:`forcing_cpu_bfloat16` overrides both. ``"tf32"`` is always
    emulated on a CPU: no CPU has TF32 units.
    """
    return _forced_cpu_bfloat16.get() or _cpu_bfloat16_default()


@contextlib.contextmanager
def forcing_cpu_bfloat16(path: str) -> Iterator[None]:
    """Programs traced inside run bfloat16 products on a CPU by ``path`` (``"native"`` or ``"emulated"``).

    JAX's caches are cleared on entry and exit: a function jitted before would
    otherwise keep the path it was traced with.
    """
    if path not in CPU_BFLOAT16_PATHS:
        raise ValueError(f"path must be one of {CPU_BFLOAT16_PATHS}, got {path!r}.")
    with retracing_with(_forced_cpu_bfloat16, path):
        yield


def describe_precision(precision: str, platform: str) -> str:
    """How the NMF op's products run in ``precision`` on ``platform`` (a jax backend name), in words."""
    if precision == "float32":
        return "float32"
    if platform != "cpu":
        return f"{precision} on the accelerator's matrix units"
    if precision == "bfloat16" and cpu_bfloat16_path() == "native":
        return "bfloat16 on the CPU's bf16 units, float32 sums"
    reason = " (no CPU has TF32 units)" if precision == "tf32" else ""
    return f"{precision}, emulated: operands rounded, float32 products{reason}"


def l1_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """Divides ``x`` by its sum over ``axis`` (plus 1e-19, the guard of the authors' code).

    Args:
      x: non-negative array of any shape.
      axis: the axis that is made to sum to one.

    Returns:
      An array of the shape of ``x``.
    """
    if x.ndim > 2 and axis in (-1, x.ndim - 1):
        # As rows: XLA's CPU compiler (jax 0.10) runs the gradient's sum over the last axis ~20x slower
        # when the axis before it has size 1, as in a single group's patches (B, H, W, 1, S).
        return l1_normalize(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    return safe_divide(x, jnp.sum(x, axis=axis, keepdims=True) + NORMALIZE_EPS)


def positive_weights(u: jax.Array) -> jax.Array:
    """Maps the unconstrained weight ``u`` to the NMF weight ``W`` (paper eq. 20).

    ``W[s, i] = |u[s, i]| / (sum_s |u[s, i]| + 1e-19)``: every column of ``W``
    is non-negative and sums to one. Gradients reach ``u`` by autodiff.

    Args:
      u: array of shape ``(S, I)``; a kernel of shape ``(..., I)`` (for example
        a convolution's ``(kh, kw, C, I)``) is normalised over all axes but the
        last, as if reshaped to ``(S, I)``.

    Returns:
      ``W``, of the shape of ``u``.
    """
    if u.ndim < 2:
        raise ValueError(f"positive_weights expects u of shape (S, I) (or (..., I)), got shape {u.shape}.")
    magnitude = jnp.abs(u)
    column_sums = jnp.sum(magnitude, axis=tuple(range(u.ndim - 1)), keepdims=True)
    return magnitude / (column_sums + NORMALIZE_EPS)


@dataclasses.dataclass(frozen=True)
class NMFOptions:
    """The static options of :func:`nmf`, validated on construction.

    One value carries them through the op's callers, the layers, the networks
    and the config (``config.model.nmf``).

    Attributes:
      iterations: ``N``, how often the update runs (paper eq. 6), an int >= 1.
      epsilon: ``None`` for the pure update (paper eq. 3), else the step size
        ``epsilon`` of eq. 6, a float > 0.
      gradient: the backward pass: ``"approx"`` (the one-step formula of paper
        eq. 17-19, default), ``"unrolled"`` (autodiff through every iteration)
        or ``"implicit"`` (the fixed point's adjoint).
      learning: the gradient handed to ``w``: ``"backprop"``, or a local NMF
        rule, ``"local_kl"`` (the KL update of paper eq. 4) or ``"local_mse"``;
        the input gradient then still follows ``gradient``.
      adjoint_iterations: iterations of the adjoint solve of ``"implicit"``
        (``None``: ``iterations``).
      precision: the operands' precision in the op's matrix products
        (:func:`matmul`): ``"float32"`` (default), ``"tf32"`` or ``"bfloat16"``.
        Float32 runs as such on every platform, so that a GPU computes what a
        CPU does; the other two use an accelerator's tensor cores; on a CPU,
        bfloat16 runs on its bf16 units where it has them
        (:func:`cpu_bfloat16_path`), else both are emulated. Sums stay float32.
      kernel: what computes the forward ``h``: ``"xla"`` (XLA's loop; the
        op's default), ``"pallas"``, ``"cpu"`` or ``"auto"`` (``train.py``'s
        default). With ``"pallas"``, the fused kernel of :mod:`nmfjax.kernels`:
        Triton on an NVIDIA GPU, Pallas's slow interpret mode elsewhere. With
        ``"cpu"``, the fused C++ kernel of :mod:`nmfjax.cpu_kernel` on a CPU
        (float32 or bfloat16; XLA's loop on other platforms). With ``"auto"``,
        Triton on an NVIDIA GPU where its programs fill the SMs, the C++ kernel
        on a CPU with AVX-512 where it compiles and the op computes in float32, or in
        bfloat16 on the CPU's bf16 units; else XLA's loop.
        Where the C++ kernel runs the forward, it runs the one-step backward
        of ``"approx"`` too (:func:`nmfjax.cpu_kernel.one_step_backward`);
        the other backward passes are XLA's, and ``"unrolled"`` differentiates
        XLA's loop.
      unroll: XLA's ``N`` updates (and the adjoint iterations of
        ``"implicit"``) as straight-line code instead of a while loop. A GPU
        then reads no loop condition back to the host, and XLA can put a
        whole step into one command buffer (CUDA graph); compiling takes
        longer. The same ``h`` and gradients to float32 round-off.
      check_inputs: a debug check that ``x`` and ``w`` are non-negative and
        finite, for a function wrapped in ``jax.experimental.checkify.checkify``
        (see :func:`nmf`). Off by default, and not a config field: a training
        step is not checkified.
    """

    iterations: int = 20
    epsilon: float | None = None
    gradient: str = "approx"
    learning: str = "backprop"
    adjoint_iterations: int | None = None
    precision: str = "float32"
    kernel: str = "xla"
    unroll: bool = False
    check_inputs: bool = dataclasses.field(default=False, metadata={"config": False})

    def __post_init__(self) -> None:
        check_positive_int("iterations", self.iterations)
        if self.adjoint_iterations is not None:
            check_positive_int("adjoint_iterations", self.adjoint_iterations)
        if self.epsilon is not None:
            if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, numbers.Real):
                raise TypeError(
                    f"epsilon must be None (pure update) or a positive float, got {self.epsilon!r} "
                    f"of type {type(self.epsilon).__name__}."
                )
            if not self.epsilon > 0:
                raise ValueError(f"epsilon must be > 0 (or None for the pure update), got {self.epsilon}.")
            object.__setattr__(self, "epsilon", float(self.epsilon))
        if not isinstance(self.unroll, bool):
            raise TypeError(f"unroll must be True or False, got {self.unroll!r}.")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}.")
        if self.learning not in LEARNING_RULES:
            raise ValueError(f"learning must be one of {LEARNING_RULES}, got {self.learning!r}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}.")
        if self.kernel == "cpu" and self.precision not in cpu_kernel.PRECISIONS:
            raise ValueError(
                f"kernel='cpu' computes in {' or '.join(cpu_kernel.PRECISIONS)}, not precision={self.precision!r}: "
                "use kernel='auto' (XLA's loop at other precisions) or 'xla'."
            )
        if not isinstance(self.check_inputs, bool):
            raise TypeError(f"check_inputs must be True or False, got {self.check_inputs!r}.")

    def replace(self, **changes: Any) -> NMFOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def check_last_axis(x: jax.Array, size: int, message: str) -> None:
    """A ``ValueError`` with ``message`` unless ``x``'s last axis has ``size`` entries (checked at trace
    time: free inside ``jit``).
    """
    chex.assert_axis_dimension(x, -1, size, custom_message=message, exception_type=ValueError)


def _check_inputs(x: jax.Array, w: jax.Array) -> None:
    """Ranks, shapes and dtypes: static, so checked once at trace time and free inside ``jit``."""
    chex.assert_rank(w, 2, custom_message=f"w must have shape (S, I), got shape {w.shape}.", exception_type=ValueError)
    check_last_axis(
        x,
        w.shape[0],
        f"x must have shape (..., S) with S = {w.shape[0]} (the rows of w, shape {w.shape}), got shape {x.shape}.",
    )
    for name, value in (("x", x), ("w", w)):
        chex.assert_type(
            value,
            float,
            custom_message=f"{name} must be a floating array (float32, bfloat16, float16 or float64), got "
            f"{value.dtype}; convert it, e.g. {name}.astype(jnp.float32).",
            exception_type=TypeError,
        )


def compute_dtype(x: jax.typing.ArrayLike, w: jax.typing.ArrayLike) -> jnp.dtype:
    """The dtype :func:`nmf` computes and returns ``h`` in: that of ``x`` and ``w`` together, at least float32.

    bfloat16, float16 and float32 inputs give float32 (the guards 1e-19 and 1e-20
    are below float16's range, and the sums of many small terms need float32's
    mantissa); float64 (with ``jax_enable_x64``) gives float64. Gradients come
    back in each input's own dtype.
    """
    return jnp.promote_types(jnp.result_type(x, w), jnp.float32)


def _check_values(x: jax.Array, w: jax.Array) -> None:
    """The opt-in debug check (``check_inputs=True``): works under ``jit`` inside ``checkify``."""
    for name, value in (("x", x), ("w", w)):
        checkify.check(
            jnp.all(value >= 0) & jnp.all(jnp.isfinite(value)),
            f"nmf: {name} must be non-negative and finite, but its smallest entry is {{low}} and "
            f"{{bad}} entries are not finite",
            low=jnp.nanmin(value),
            bad=jnp.sum(~jnp.isfinite(value)),
        )


def nmf_update(
    h: jax.Array,
    x: jax.Array,
    w: jax.Array,
    epsilon: float | None = None,
    precision: str = "float32",
    w_transposed: jax.Array | None = None,
) -> jax.Array:
    """One normalised multiplicative update of ``h`` (paper eq. 3, or eq. 6 with ``epsilon``).

    Args:
      h: current activations, shape ``(..., I)``.
      x: input, shape ``(..., S)``.
      w: positive weight, shape ``(S, I)``.
      epsilon: ``None`` for the pure update ``h * f``, else ``h * (1 + epsilon * f)``.
      precision: of the two products ``W h`` and ``W^T (x / R)`` (see :func:`matmul`).
      w_transposed: ``W^T``, shape ``(I, S)``, where the caller has it (default: ``w.T``). A loop
        of updates passes one made before the loop: XLA's CPU compiler runs a bfloat16 product
        whose second operand is transposed inside it in float32, but one on an array of
        ``(I, S)`` on the bf16 units.

    Returns:
      The next ``h``, shape ``(..., I)``, non-negative and summing to one.
    """
    if w_transposed is None:
        w_transposed = w.T
    reconstruction = matmul(h, w_transposed, precision) + RECONSTRUCTION_EPS
    factor = matmul(safe_divide(x, reconstruction), w, precision)
    h = h * factor if epsilon is None else h * (1 + epsilon * factor)
    return l1_normalize(h)


def _iterate(x: jax.Array, w: jax.Array, options: NMFOptions) -> jax.Array:
    dtype = jnp.result_type(x, w)
    num_hidden = w.shape[1]
    h = jnp.full(x.shape[:-1] + (num_hidden,), 1.0 / num_hidden, dtype)
    update = functools.partial(nmf_update, epsilon=options.epsilon, precision=options.precision)
    w_transposed = w.T  # once, outside the loop (see nmf_update)
    return _repeat(options.iterations, lambda h: update(h, x, w, w_transposed=w_transposed), h, options.unroll)


def _repeat(times: int, body: Callable[[jax.Array], jax.Array], value: jax.Array, unroll: bool) -> jax.Array:
    """``body`` applied ``times`` times: a while loop, or with ``unroll`` straight-line code."""
    if unroll:
        for _ in range(times):
            value = body(value)
        return value
    return lax.fori_loop(0, times, lambda _, v: body(v), value)


def _forward(x: jax.Array, w: jax.Array, options: NMFOptions) -> jax.Array:
    """The forward ``h`` of the custom VJPs: XLA's loop or the fused kernel (``options.kernel``)."""
    if options.kernel == "xla":
        return _iterate(x, w, options)
    return kernels.forward(
        x,
        w,
        iterations=options.iterations,
        epsilon=options.epsilon,
        precision=options.precision,
        kernel=options.kernel,
        xla=functools.partial(_iterate, options=options),
        cpu_bfloat16_path=cpu_bfloat16_path(),
    )


def _sum_positions(a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
    """``sum_p a[p, s] * b[p, i]`` over all leading axes: shape ``(S, I)``."""
    # One plain GEMM over flattened positions; XLA handles several contracting axes less well.
    return matmul(a.reshape(-1, a.shape[-1]).T, b.reshape(-1, b.shape[-1]), precision)


def _laid_out_for_bfloat16(transposed: jax.Array, precision: str) -> jax.Array:
    """``transposed`` made as an array of its own in bfloat16 (else unchanged).

    XLA's CPU compiler (jax 0.10) runs a bfloat16 product whose operand it sees transposed as a
    float32 product of rounded operands: slower than float32. A transpose made before the product
    (the barrier keeps XLA from folding it back in) lets the product run on the bf16 units; in the
    one-step VJP that made CNMF+1x1's bfloat16 train step ~7 % faster.
    """
    return lax.optimization_barrier(transposed) if precision == "bfloat16" else transposed


# The custom VJPs take the (hashable, static) options as their last argument.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _nmf_approx(x: jax.Array, w: jax.Array, options: NMFOptions) -> jax.Array:
    return _forward(x, w, options)


def _iterate_keeping_residuals(x: jax.Array, w: jax.Array, options: NMFOptions) -> tuple[jax.Array, Residuals]:
    """Forward pass of both custom VJPs: only ``x``, ``W`` and the final ``h`` are kept."""
    h = _forward(x, w, options)
    return h, (x, w, h)


def _nmf_approx_bwd(options: NMFOptions, residuals: Residuals, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The paper's one-step VJP at the returned ``h`` (eq. 17-19): :func:`one_step_vjp`, by the C++
    kernel where ``options.kernel`` runs the forward there (:func:`nmfjax.kernels.one_step_backward`).
    """
    x, w, h = residuals
    return kernels.one_step_backward(
        x,
        w,
        h,
        g,
        precision=options.precision,
        kernel=options.kernel,
        xla=functools.partial(one_step_vjp, precision=options.precision),
        cpu_bfloat16_path=cpu_bfloat16_path(),
    )


def one_step_vjp(
    x: jax.Array, w: jax.Array, h: jax.Array, g: jax.Array, precision: str = "float32"
) -> tuple[jax.Array, jax.Array]:
    """The paper's one-step VJP at ``h`` (eq. 17-19), in XLA.

    ``dx[s] = sum_i W[s,i] h[i] g[i] / R[s]`` and
    ``dW[s,i] = sum_positions h[i] x[s] / R[s] * (g[i] - dx[s])``.
    The one-step formula is the same for the pure and the ``epsilon`` update.

    Args:
      x: input, shape ``(P, S)``.
      w: weight, shape ``(S, I)``.
      h: the ``h`` the op returned, shape ``(P, I)``.
      g: its cotangent, shape ``(P, I)``.
      precision: of the four products (see :func:`matmul`).

    Returns:
      ``(dx, dW)`` in the dtypes of ``x`` and ``w``.
    """
    w_transposed = _laid_out_for_bfloat16(w.T, precision)
    reconstruction = matmul(h, w_transposed, precision) + RECONSTRUCTION_EPS
    weighted_error = h * g
    dx = matmul(weighted_error, w_transposed, precision) / reconstruction
    ratio = x / reconstruction
    # dW^T = (h g)^T ratio - h^T (ratio dx), summed over all positions: the narrow operands transposed
    # first, as one array, and dW^T transposed last (see _laid_out_for_bfloat16).
    hidden, features = h.shape[-1], x.shape[-1]
    rows = jnp.concatenate([weighted_error, h], axis=-1).reshape(-1, 2 * hidden)
    rows = _laid_out_for_bfloat16(rows.T, precision)
    dw_transposed = matmul(rows[:hidden], ratio.reshape(-1, features), precision) - matmul(
        rows[hidden:], (ratio * dx).reshape(-1, features), precision
    )
    return dx.astype(x.dtype), dw_transposed.T.astype(w.dtype)


_nmf_approx.defvjp(_iterate_keeping_residuals, _nmf_approx_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _nmf_implicit(x: jax.Array, w: jax.Array, options: NMFOptions) -> jax.Array:
    return _forward(x, w, options)


def _nmf_implicit_bwd(options: NMFOptions, residuals: Residuals, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Implicit-function VJP at ``h* = F(h*, x, W)``: ``v = g + (dF/dh)^T v`` is
    iterated ``adjoint_iterations`` times from ``v = g`` (a truncated Neumann
    series), then ``(dx, dW) = (dF/dx, dF/dW)^T v``.
    """
    x, w, h = residuals
    update = functools.partial(nmf_update, epsilon=options.epsilon, precision=options.precision)
    _, vjp_h = jax.vjp(lambda h_: update(h_, x, w), h)
    adjoint_iterations = options.adjoint_iterations or options.iterations
    adjoint = _repeat(adjoint_iterations, lambda v: g + vjp_h(v)[0], g, options.unroll)
    _, vjp_inputs = jax.vjp(lambda x_, w_: update(h, x_, w_), x, w)
    return vjp_inputs(adjoint)


_nmf_implicit.defvjp(_iterate_keeping_residuals, _nmf_implicit_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _with_local_weight_gradient(h: jax.Array, x: jax.Array, w: jax.Array, options: NMFOptions) -> jax.Array:
    return h


def _local_fwd(h: jax.Array, x: jax.Array, w: jax.Array, options: NMFOptions) -> tuple[jax.Array, Residuals]:
    return h, (x, w, h)


def _local_bwd(options: NMFOptions, residuals: Residuals, g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Passes ``g`` through to ``h`` and hands ``w`` a local NMF rule (the KL update of paper eq. 4, or MSE):
    ``local_kl: -h x / R``, ``local_mse: -2 h (x - R)``, summed over positions.
    """
    x, w, h = residuals
    reconstruction = matmul(h, w.T, options.precision)
    if options.learning == "local_kl":
        dw = -_sum_positions(x / (reconstruction + RECONSTRUCTION_EPS), h, options.precision)
    else:
        dw = -2 * _sum_positions(x - reconstruction, h, options.precision)
    return g, jnp.zeros_like(x), dw.astype(w.dtype)


_with_local_weight_gradient.defvjp(_local_fwd, _local_bwd)


def nmf(
    x: jax.typing.ArrayLike, w: jax.typing.ArrayLike, options: NMFOptions | None = None, **fields: Any
) -> jax.Array:
    """Runs ``N`` NMF updates of ``h`` for input ``x`` and weight ``w`` (paper eq. 6, or eq. 3 when pure).

    ``x`` is used as given (the layers L1-normalise it first); in the pure mode
    ``h`` does not change when ``x`` is rescaled.

    Args:
      x: non-negative input of shape ``(..., S)``; leading axes are independent
        positions sharing ``w``.
      w: positive weight of shape ``(S, I)``, columns summing to one (see
        :func:`positive_weights`).
      options: an :class:`NMFOptions` (default: ``NMFOptions()``).
      **fields: fields of :class:`NMFOptions` that replace those of ``options``,
        e.g. ``nmf(x, w, iterations=50, gradient="implicit")``.

    Returns:
      ``h`` of shape ``(..., I)``: non-negative, summing to one over the last
      axis, in :func:`compute_dtype` (float32 for bfloat16, float16 and float32
      inputs).

    Raises:
      ValueError: ``w`` is not 2-D or ``x``'s last axis is not ``S``.
      TypeError: ``x`` or ``w`` is not a floating array.

    Input contract: ``x`` and ``w`` non-negative and finite. The op does not
    check values by default (that would cost a pass over ``x``): an all-zero
    row of ``x`` gives ``h = 0`` in the pure mode and ``h = 1/I`` (its start,
    which ``h * (1 + epsilon * 0)`` leaves) with ``epsilon``, with finite
    gradients in both; negative entries have
    no meaning for NMF, and what comes out is unspecified; a NaN or infinity
    gives NaN. To find such inputs, turn on ``check_inputs`` and wrap the
    function in ``checkify``, jitted or not::

        from jax.experimental import checkify

        checked = jax.jit(checkify.checkify(lambda x, w: nmf(x, w, check_inputs=True)))
        error, h = checked(x, w)
        error.throw()  # raises, naming the smallest entry, if x or w is negative or not finite
    """
    options = dataclasses.replace(options or NMFOptions(), **fields) if fields else options or NMFOptions()
    x = jnp.asarray(x)
    w = jnp.asarray(w)
    _check_inputs(x, w)
    if options.check_inputs:
        _check_values(x, w)
    dtype = compute_dtype(x, w)
    if options.precision != "float32" and dtype != jnp.float32:
        raise TypeError(
            f"precision={options.precision!r} rounds float32 operands, but x and w compute in {dtype}; "
            "use precision='float32' with float64."
        )
    x, w = x.astype(dtype), w.astype(dtype)
    # All positions as the rows of one matrix, so that every product is a plain GEMM.
    h = _nmf(x.reshape(-1, x.shape[-1]), w, options)
    return h.reshape(*x.shape[:-1], w.shape[1])


# Jitted so that eager calls run as one compiled program; inside a caller's jit it is inlined.
@functools.partial(jax.jit, static_argnums=2)
def _nmf(x: jax.Array, w: jax.Array, options: NMFOptions) -> jax.Array:
    core_w = w if options.learning == "backprop" else lax.stop_gradient(w)
    if options.gradient == "approx":
        h = _nmf_approx(x, core_w, options)
    elif options.gradient == "unrolled":
        h = _iterate(x, core_w, options)
    else:
        h = _nmf_implicit(x, core_w, options)
    if options.learning != "backprop":
        h = _with_local_weight_gradient(h, x, w, options)
    return h
