"""Flax NNX layers built on the NMF op: dense and patch-wise convolutional NMF.

Both layers L1-normalise their input (per position, per patch) and own the raw
weight ``u`` of SPEC section 1 as ``kernel``, a :class:`NMFWeight` variable.
``NMFWeight`` subclasses ``nnx.Param``, so ordinary optimisers train it, and an
optimiser can still single it out (``nnx.OfType(NMFWeight)``) to give it its
own learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from nmfjax import ops

PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]


class NMFWeight(nnx.Param):
    """The unconstrained NMF weight ``u``; the op uses ``positive_weights(u)``."""


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


class L1Normalize(nnx.Module):
    """Divides its input by its sum over the last axis (plus 1e-19)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.l1_normalize(x)


class _NMFOptions:
    """Validates and stores the op's static options shared by both layers."""

    def _set_nmf_options(self, iterations, epsilon, gradient, learning, adjoint_iterations):
        ops.check_nmf_options(iterations, epsilon, gradient, learning, adjoint_iterations)
        self.iterations = iterations
        self.epsilon = epsilon
        self.gradient = gradient
        self.learning = learning
        self.adjoint_iterations = adjoint_iterations

    def _nmf(self, x: jax.Array, w: jax.Array) -> jax.Array:
        return ops.nmf(
            x,
            w,
            iterations=self.iterations,
            epsilon=self.epsilon,
            gradient=self.gradient,
            learning=self.learning,
            adjoint_iterations=self.adjoint_iterations,
        )


class NMFDense(nnx.Module, _NMFOptions):
    """Dense NMF layer: ``h = nmf(x / sum(x), positive_weights(kernel))``.

    Input ``(..., in_features)``, non-negative; output ``(..., out_features)``,
    non-negative and summing to one.

    Args:
      in_features: ``S``, size of the input's last axis.
      out_features: ``I``, number of hidden units.
      iterations, epsilon, gradient, learning, adjoint_iterations: options of
        :func:`nmfjax.ops.nmf`.
      kernel_init: initialiser of ``u`` (default Uniform(0, 1), SPEC section 1).
      param_dtype: dtype of ``u``.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        iterations: int = 20,
        epsilon: float | None = None,
        gradient: str = "approx",
        learning: str = "backprop",
        adjoint_iterations: int | None = None,
        kernel_init: nnx.Initializer = nnx.initializers.uniform(scale=1.0),
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        self._set_nmf_options(iterations, epsilon, gradient, learning, adjoint_iterations)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = NMFWeight(kernel_init(rngs.params(), (in_features, out_features), param_dtype))

    def nmf_weights(self) -> jax.Array:
        """The positive weight ``W`` of shape ``(in_features, out_features)``."""
        return ops.positive_weights(self.kernel[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"NMFDense expects inputs with in_features={self.in_features} on the last axis, "
                f"got shape {x.shape}."
            )
        return self._nmf(ops.l1_normalize(x), self.nmf_weights())


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}.")
    for entry in pair:
        _check_positive_int(name, entry)
    return pair


def _padding_pairs(padding: PaddingLike) -> str | tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs of ints, got {padding!r}.")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    entries = list(padding)
    if len(entries) == 2 and all(isinstance(entry, int) for entry in entries):
        return tuple((entry, entry) for entry in entries)
    if len(entries) == 2 and all(len(entry) == 2 for entry in entries):
        return tuple(tuple(entry) for entry in entries)
    raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs of ints, got {padding!r}.")


def extract_patches(
    x: jax.Array,
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding: str | Sequence[tuple[int, int]],
    kernel_dilation: tuple[int, int],
) -> jax.Array:
    """All ``k x k`` patches of an NHWC batch, as a convolution would see them.

    Returns shape ``(B, H', W', C * kh * kw)`` with the channel axis outermost in
    the patch vector (index ``c * kh * kw + dy * kw + dx``).
    """
    return lax.conv_general_dilated_patches(
        x,
        filter_shape=kernel_size,
        window_strides=strides,
        padding=padding,
        rhs_dilation=kernel_dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )


class NMFConv(nnx.Module, _NMFOptions):
    """Patch-wise convolutional NMF (SPEC section 2), NHWC.

    Every output position takes its ``k x k`` patch (stride, padding and
    dilation as for a convolution), L1-normalises it and runs the NMF op on it;
    positions are independent NMF problems sharing the weight. With
    ``feature_group_count = G`` the ``C`` input channels and ``I`` outputs split
    into ``G`` groups with separate weights; each group's patch is normalised on
    its own (in the pure mode this gives the same ``h`` as normalising the whole
    patch, since ``h`` is invariant to the input's scale).

    ``kernel`` has Flax's convolution layout ``(kh, kw, C / G, I)``.

    Args:
      in_features: input channels ``C``.
      out_features: output channels ``I``.
      kernel_size: ``k`` or ``(kh, kw)``.
      strides, padding, kernel_dilation, feature_group_count: as ``nnx.Conv``.
      iterations, epsilon, gradient, learning, adjoint_iterations: options of
        :func:`nmfjax.ops.nmf`.
      kernel_init: initialiser of ``u`` (default Uniform(0, 1)).
      param_dtype: dtype of ``u``.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: PaddingLike = "VALID",
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        iterations: int = 20,
        epsilon: float | None = None,
        gradient: str = "approx",
        learning: str = "backprop",
        adjoint_iterations: int | None = None,
        kernel_init: nnx.Initializer = nnx.initializers.uniform(scale=1.0),
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        _check_positive_int("feature_group_count", feature_group_count)
        if in_features % feature_group_count or out_features % feature_group_count:
            raise ValueError(
                f"feature_group_count={feature_group_count} must divide in_features={in_features} "
                f"and out_features={out_features}."
            )
        self._set_nmf_options(iterations, epsilon, gradient, learning, adjoint_iterations)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.strides = _pair("strides", strides)
        self.padding = _padding_pairs(padding)
        self.kernel_dilation = _pair("kernel_dilation", kernel_dilation)
        self.feature_group_count = feature_group_count
        kernel_shape = (*self.kernel_size, in_features // feature_group_count, out_features)
        self.kernel = NMFWeight(kernel_init(rngs.params(), kernel_shape, param_dtype))

    def nmf_weights(self) -> jax.Array:
        """The positive weights per group, shape ``(G, C/G * kh * kw, I/G)``.

        Rows follow the patch vector's order ``(c, dy, dx)`` of :func:`extract_patches`.
        """
        groups = self.feature_group_count
        w = ops.positive_weights(self.kernel[...])  # (kh, kw, C/G, I)
        w = jnp.transpose(w, (2, 0, 1, 3)).reshape(-1, groups, self.out_features // groups)
        return jnp.transpose(w, (1, 0, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"NMFConv expects NHWC inputs with in_features={self.in_features} channels, "
                f"got shape {x.shape}."
            )
        groups = self.feature_group_count
        patches = extract_patches(x, self.kernel_size, self.strides, self.padding, self.kernel_dilation)
        # The channel axis is outermost in a patch, so each group's values are contiguous.
        patches = ops.l1_normalize(patches.reshape(*patches.shape[:-1], groups, -1))
        group_nmf = jax.vmap(self._nmf, in_axes=(-2, 0), out_axes=-2)
        h = group_nmf(patches, self.nmf_weights())  # (B, H', W', G, I/G)
        return h.reshape(*h.shape[:-2], self.out_features)
