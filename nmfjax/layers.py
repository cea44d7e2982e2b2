"""Flax NNX layers built on the NMF op: dense and patch-wise convolutional NMF.

Both layers L1-normalise their input (per position, per patch) and own the raw
weight ``U`` of the paper's eq. 20 as ``kernel``, a :class:`NMFWeight` variable.
``NMFWeight`` subclasses ``nnx.Param``, so ordinary optimisers train it, and an
optimiser can still single it out (``nnx.OfType(NMFWeight)``) to give it its
own learning rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from nmfjax import ops
from nmfjax.validation import check_positive_int

PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]


class NMFWeight(nnx.Param):
    """The unconstrained NMF weight ``u``; the op uses ``positive_weights(u)``."""


class PatchConvWeight(nnx.Param):
    """The kernel of a :class:`PatchConv`, the CNNs' counterpart of :class:`NMFWeight`."""


class L1Normalize(nnx.Module):
    """Divides its input by its sum over the last axis (plus 1e-19)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(..., S) -> (..., S)``, each row summing to 1."""
        return ops.l1_normalize(x)


class NMFDense(nnx.Module):
    """Dense NMF layer: ``h = nmf(x / sum(x), positive_weights(kernel))``.

    Input ``(..., in_features)``, non-negative; output ``(..., out_features)``,
    non-negative and summing to one.

    Args:
      in_features: ``S``, size of the input's last axis.
      out_features: ``I``, number of hidden units.
      options: the op's :class:`~nmfjax.ops.NMFOptions` (default: ``NMFOptions()``).
      kernel_init: initialiser of ``u`` (default Uniform(0, 1)).
      param_dtype: dtype of ``u``.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      **option_fields: fields of :class:`~nmfjax.ops.NMFOptions` replacing those
        of ``options``, e.g. ``NMFDense(8, 4, iterations=50, rngs=rngs)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        options: ops.NMFOptions | None = None,
        kernel_init: nnx.Initializer = nnx.initializers.uniform(scale=1.0),
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
        **option_fields: Any,
    ) -> None:
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        self.options = (options or ops.NMFOptions()).replace(**option_fields)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = NMFWeight(kernel_init(rngs.params(), (in_features, out_features), param_dtype))

    def nmf_weights(self) -> jax.Array:
        """The positive weight ``W`` of shape ``(in_features, out_features)``."""
        return ops.positive_weights(self.kernel[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(..., in_features)`` non-negative -> ``(..., out_features)``: :func:`nmf_dense` of each row."""
        return nmf_dense(x, self.kernel[...], self.options)


def nmf_dense(x: jax.Array, kernel: jax.Array, options: ops.NMFOptions) -> jax.Array:
    """Dense NMF: ``nmf(x / sum(x), positive_weights(kernel))`` over the last axis.

    Args:
      x: ``(..., S)`` non-negative input.
      kernel: the raw weight ``u``, ``(S, I)``.
      options: the op's options.

    Returns:
      ``(..., I)``, non-negative and summing to one.
    """
    ops.check_last_axis(
        x,
        kernel.shape[0],
        f"NMFDense expects inputs with in_features={kernel.shape[0]} on the last axis, got shape {x.shape}.",
    )
    return ops.nmf(ops.l1_normalize(x), ops.positive_weights(kernel), options)


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}.")
    for entry in pair:
        check_positive_int(name, entry)
    return pair


def _padding_pairs(padding: PaddingLike) -> str | tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs of ints, got {padding!r}.")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    entries = list(padding)
    ints = [entry for entry in entries if isinstance(entry, int)]
    pairs = [entry for entry in entries if isinstance(entry, Sequence) and len(entry) == 2]
    if len(entries) == 2 and len(ints) == 2:
        return tuple((entry, entry) for entry in ints)
    if len(entries) == 2 and len(pairs) == 2:
        return tuple((int(pair[0]), int(pair[1])) for pair in pairs)
    raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs of ints, got {padding!r}.")


def extract_patches(
    x: jax.Array,
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding: str | Sequence[tuple[int, int]],
    kernel_dilation: tuple[int, int],
) -> jax.Array:
    """All ``k x k`` patches of an NHWC batch, as a convolution would see them.

    Built from ``kh * kw`` strided slices (pure data movement: no FLOPs, and a
    cheap pad-and-add as its gradient).

    Returns:
      Shape ``(B, H', W', kh, kw, C)``: the patch of output position ``(y, x)``
      in Flax's kernel order ``(dy, dx, c)``.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, kernel_dilation
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], span, (sh, sw), padding)
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_h = (x.shape[1] - span[0]) // sh + 1
    out_w = (x.shape[2] - span[1]) // sw + 1
    rows = [
        jnp.stack(
            [
                x[:, dy * dh : dy * dh + (out_h - 1) * sh + 1 : sh, dx * dw : dx * dw + (out_w - 1) * sw + 1 : sw]
                for dx in range(kw)
            ],
            axis=3,
        )
        for dy in range(kh)
    ]
    return jnp.stack(rows, axis=3)


@dataclasses.dataclass(frozen=True)
class PatchGeometry:
    """How a patch-wise layer sees its NHWC input: every output position takes its
    ``k x k`` patch (stride, padding and dilation as for a convolution) and
    L1-normalises it. With ``feature_group_count = G`` the input channels and the
    outputs split into ``G`` groups with separate weights; each group's part of the
    patch is normalised on its own. Kernels have Flax's convolution layout
    ``(kh, kw, C / G, I)``. Build it with :meth:`of`, which checks the values;
    the Flax NNX layers here and those of :mod:`nmfjax.linen` share it.
    """

    in_features: int
    out_features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    padding: str | tuple[tuple[int, int], ...]
    kernel_dilation: tuple[int, int]
    feature_group_count: int

    @classmethod
    def of(
        cls,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        padding: PaddingLike = "VALID",
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
    ) -> PatchGeometry:
        """The geometry of a layer's arguments, as ``nnx.Conv`` takes them (ints or pairs)."""
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_positive_int("feature_group_count", feature_group_count)
        if in_features % feature_group_count or out_features % feature_group_count:
            raise ValueError(
                f"feature_group_count={feature_group_count} must divide in_features={in_features} and "
                f"out_features={out_features}."
            )
        return cls(
            in_features,
            out_features,
            _pair("kernel_size", kernel_size),
            _pair("strides", strides),
            _padding_pairs(padding),
            _pair("kernel_dilation", kernel_dilation),
            feature_group_count,
        )

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """``(kh, kw, C / G, I)``."""
        return (*self.kernel_size, self.in_features // self.feature_group_count, self.out_features)

    def patches(self, x: jax.Array, layer: str = "the layer") -> jax.Array:
        """``(B, H, W, C)`` -> ``(B, H', W', G, kh * kw * C/G)``: each output position's patch
        split into the groups' parts, not normalised (a linear map of ``x``).
        """
        message = f"{layer} expects NHWC inputs with in_features={self.in_features} channels, got shape {x.shape}."
        chex.assert_rank(x, 4, custom_message=message, exception_type=ValueError)
        ops.check_last_axis(x, self.in_features, message)
        patches = extract_patches(x, self.kernel_size, self.strides, self.padding, self.kernel_dilation)
        groups = self.feature_group_count
        if groups > 1:  # (..., kh, kw, C) -> (..., G, kh, kw, C/G)
            patches = jnp.moveaxis(patches.reshape(*patches.shape[:-1], groups, -1), -2, -4)
        return patches.reshape(*patches.shape[:3], groups, -1)

    def grouped(self, kernel: jax.Array) -> jax.Array:
        """``(kh, kw, C/G, I)`` -> ``(G, kh * kw * C/G, I/G)``, rows in the patch order ``(dy, dx, c)``."""
        groups = self.feature_group_count
        kernel = kernel.reshape(-1, groups, self.out_features // groups)
        return jnp.transpose(kernel, (1, 0, 2))

    def merge_groups(self, y: jax.Array) -> jax.Array:
        """``(..., G, I/G)`` -> ``(..., I)``."""
        return y.reshape(*y.shape[:-2], self.out_features)


def nmf_conv(x: jax.Array, kernel: jax.Array, geometry: PatchGeometry, options: ops.NMFOptions) -> jax.Array:
    """Convolutional NMF (paper section 2.4.1): the NMF op on every L1-normalised patch, per group.

    Args:
      x: ``(B, H, W, C)`` non-negative input.
      kernel: the raw weight ``u``, ``geometry.kernel_shape``; the op uses ``positive_weights(u)``.
      geometry: the patches and groups.
      options: the op's options.

    Returns:
      ``(B, H', W', I)``.
    """
    patches = ops.l1_normalize(geometry.patches(x, "NMFConv"))
    weights = geometry.grouped(ops.positive_weights(kernel))
    if geometry.feature_group_count == 1:  # vmap over one group would only add transposes
        return ops.nmf(patches[..., 0, :], weights[0], options)
    group_nmf = jax.vmap(lambda p, w: ops.nmf(p, w, options), in_axes=(-2, 0), out_axes=-2)
    return geometry.merge_groups(group_nmf(patches, weights))


class _PatchLayer(nnx.Module):
    """What the NNX patch-wise layers share: the patch geometry (:class:`PatchGeometry`, whose fields
    are attributes of the layer too: ``kernel_size``, ``feature_group_count``, ...) and a kernel of
    shape ``(kh, kw, C/G, I)`` of the subclass's ``weight_type``, from ``kernel_init`` (default: the
    subclass's ``default_kernel_init``).
    """

    weight_type: type[nnx.Param]
    default_kernel_init: staticmethod

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
        kernel_init: nnx.Initializer | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        geometry = self.geometry = PatchGeometry.of(
            in_features, out_features, kernel_size, strides, padding, kernel_dilation, feature_group_count
        )
        self.in_features, self.out_features = geometry.in_features, geometry.out_features
        self.kernel_size, self.strides, self.padding = geometry.kernel_size, geometry.strides, geometry.padding
        self.kernel_dilation, self.feature_group_count = geometry.kernel_dilation, geometry.feature_group_count
        init = kernel_init or self.default_kernel_init
        self.kernel = self.weight_type(init(rngs.params(), geometry.kernel_shape, param_dtype))

    def grouped_patches(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, C)`` -> ``(B, H', W', G, kh * kw * C/G)``: each output position's patch
        split into the groups' parts, not normalised (a linear map of ``x``).
        """
        return self.geometry.patches(x, type(self).__name__)


#: The NMF options a layer takes as keyword arguments besides ``options``.
_OPTION_FIELDS = frozenset(field.name for field in dataclasses.fields(ops.NMFOptions))


class NMFConv(_PatchLayer):
    """Patch-wise convolutional NMF, NHWC (the CNMF module of the paper, section 2.4.1).

    Every output position runs the NMF op on its L1-normalised patch; positions
    are independent NMF problems sharing the weight (the overlapping patches are
    not reconstructed jointly). With ``feature_group_count = G`` each group is
    an NMF unit of its own (in the pure mode ``h`` does not depend on how the
    patch is scaled).

    Args:
      in_features: input channels ``C``.
      out_features: output channels ``I``.
      kernel_size: ``k`` or ``(kh, kw)``.
      strides, padding, kernel_dilation, feature_group_count: as ``nnx.Conv``.
      options: the op's :class:`~nmfjax.ops.NMFOptions` (default: ``NMFOptions()``).
      kernel_init: initialiser of ``u`` (default Uniform(0, 1)).
      param_dtype: dtype of ``u``.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      **option_fields: fields of :class:`~nmfjax.ops.NMFOptions` replacing those
        of ``options``, e.g. ``iterations=50, gradient="implicit"``.
    """

    weight_type = NMFWeight
    default_kernel_init = staticmethod(nnx.initializers.uniform(scale=1.0))

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        options: ops.NMFOptions | None = None,
        rngs: nnx.Rngs,
        **fields: Any,
    ) -> None:
        option_fields = {name: fields.pop(name) for name in list(fields) if name in _OPTION_FIELDS}
        super().__init__(in_features, out_features, kernel_size, rngs=rngs, **fields)
        self.options = (options or ops.NMFOptions()).replace(**option_fields)

    def nmf_weights(self) -> jax.Array:
        """The positive weights per group, shape ``(G, kh * kw * C/G, I/G)``.

        Rows follow the patch order ``(dy, dx, c)`` of :func:`extract_patches`.
        """
        return self.geometry.grouped(ops.positive_weights(self.kernel[...]))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, C)`` non-negative -> ``(B, H', W', features)``: the NMF of every patch, per group."""
        return nmf_conv(x, self.kernel[...], self.geometry, self.options)

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """The input rebuilt from the layer's output: ``R = W h`` at every position.

        Each position's reconstruction (a normalised patch) is scaled back by the
        L1 norm of its input patch, and overlapping patches are averaged per
        pixel. Where ``h`` explains the patches exactly, this returns ``x``.

        Args:
          x: ``(B, H, W, C)`` non-negative input.

        Returns:
          ``(B, H, W, C)``; pixels no patch covers are 0.
        """
        h = self(x)
        weights = self.nmf_weights()
        h = h.reshape(*h.shape[:-1], self.feature_group_count, -1)
        patches, overlap_add = jax.vjp(self.grouped_patches, x)
        scale = jnp.sum(patches, axis=-1, keepdims=True)
        (summed,) = overlap_add(jnp.einsum("...gi,gsi->...gs", h, weights) * scale)
        (coverage,) = overlap_add(jnp.ones_like(patches))
        return jnp.where(coverage > 0, summed / jnp.maximum(coverage, 1), 0.0)


class PatchConv(_PatchLayer):
    """Convolution without bias over L1-normalised patches: the CNN counterpart of
    :class:`NMFConv` (module a of the paper's CNN models, Figure 4b).

    Args are those of :class:`NMFConv` without the NMF options; ``kernel_init``
    defaults to PyTorch's convolution initialisation, Uniform(+-1/sqrt(fan_in)).
    """

    weight_type = PatchConvWeight
    default_kernel_init = staticmethod(nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, C) -> (B, H', W', features)``: each normalised patch times the kernel, per group."""
        patches = ops.l1_normalize(self.grouped_patches(x))
        kernel = self.geometry.grouped(self.kernel[...])
        return self.geometry.merge_groups(jnp.einsum("...gs,gsi->...gi", patches, kernel))
