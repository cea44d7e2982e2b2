"""NMF layers for Flax Linen models: :class:`NMFDense`, :class:`NMFConv` and :class:`L1Normalize`.

They take the arguments of the Flax NNX layers of :mod:`nmfjax.layers` (but
``rngs``: Linen passes its own) and compute with the same functions
(:func:`nmfjax.layers.nmf_dense`, :func:`nmfjax.layers.nmf_conv`), so a Linen
layer and an NNX layer with the same weights give the same outputs and
gradients. The NMF options are one :class:`~nmfjax.ops.NMFOptions`::

    NMFConv(3, 32, kernel_size=5, options=NMFOptions(iterations=20, gradient="approx"))

The raw NMF weight ``u`` (paper eq. 20) is the parameter :data:`NMF_KERNEL`
(``"nmf_kernel"``) in the ``"params"`` collection: it trains with the other
parameters wherever a Linen training loop takes ``variables["params"]``, and
its distinct name lets an optimiser give it its own learning rate
(:func:`nmf_labels` for ``optax.multi_transform``). The layers hold no other
state and draw no random numbers after initialisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from nmfjax import ops
from nmfjax.layers import PaddingLike, PatchGeometry, nmf_conv, nmf_dense

#: The name of the raw NMF weight ``u`` in the ``"params"`` collection.
NMF_KERNEL = "nmf_kernel"

_UNIFORM = nn.initializers.uniform(scale=1.0)  # as the NNX layers: u ~ Uniform(0, 1)


class L1Normalize(nn.Module):
    """Divides its input by its sum over the last axis (plus 1e-19)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(..., S) -> (..., S)``, each row summing to 1."""
        return ops.l1_normalize(x)


if TYPE_CHECKING:  # Flax declares its fields' keywords to type checkers through this stub
    from flax.linen.module import module_field as _option_field
else:
    _option_field = dataclasses.field


class _FromOptions:
    """The default of a layer's option field: the value of its ``options``."""

    def __repr__(self) -> str:
        return "<from options>"


FROM_OPTIONS: Any = _FromOptions()


class _NMFOptionFields(nn.Module):
    """The fields of :class:`~nmfjax.ops.NMFOptions` as keyword attributes of a layer, as the NNX
    layers take them (``NMFConv(3, 8, kernel_size=3, iterations=10)``): each one given replaces
    that field of ``options``.
    """

    options: ops.NMFOptions = _option_field(default=ops.NMFOptions(), kw_only=True)
    iterations: int = _option_field(default=FROM_OPTIONS, kw_only=True)
    epsilon: float | None = _option_field(default=FROM_OPTIONS, kw_only=True)
    gradient: str = _option_field(default=FROM_OPTIONS, kw_only=True)
    learning: str = _option_field(default=FROM_OPTIONS, kw_only=True)
    adjoint_iterations: int | None = _option_field(default=FROM_OPTIONS, kw_only=True)
    precision: str = _option_field(default=FROM_OPTIONS, kw_only=True)
    kernel: str = _option_field(default=FROM_OPTIONS, kw_only=True)
    unroll: bool = _option_field(default=FROM_OPTIONS, kw_only=True)
    check_inputs: bool = _option_field(default=FROM_OPTIONS, kw_only=True)

    @property
    def nmf_options(self) -> ops.NMFOptions:
        """``options`` with the option fields given to the layer in place of its own."""
        fields = (field.name for field in dataclasses.fields(ops.NMFOptions))
        given = {name: getattr(self, name) for name in fields if getattr(self, name) is not FROM_OPTIONS}
        return self.options.replace(**given)


class NMFDense(_NMFOptionFields):
    """Dense NMF: ``h = nmf(x / sum(x), positive_weights(nmf_kernel))``, as :class:`nmfjax.layers.NMFDense`.

    Attributes:
      in_features: ``S``, size of the input's last axis.
      out_features: ``I``, number of hidden units.
      options: the op's :class:`~nmfjax.ops.NMFOptions`; the keyword attributes ``iterations``,
        ``epsilon``, ``gradient``, ... (every field of ``NMFOptions``) replace its fields, as
        ``NMFDense(8, 4, iterations=50)``.
      kernel_init: initialiser of ``u`` (default Uniform(0, 1)); ``param_dtype`` is its dtype.
    """

    in_features: int
    out_features: int
    kernel_init: nn.initializers.Initializer = _UNIFORM
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(..., in_features)`` non-negative -> ``(..., out_features)``."""
        shape = (self.in_features, self.out_features)
        kernel = self.param(NMF_KERNEL, self.kernel_init, shape, self.param_dtype)
        return nmf_dense(x, kernel, self.nmf_options)


class NMFConv(_NMFOptionFields):
    """Patch-wise convolutional NMF, NHWC, as :class:`nmfjax.layers.NMFConv` (paper section 2.4.1).

    Attributes:
      in_features: input channels ``C``.
      out_features: output channels ``I``.
      kernel_size: ``k`` or ``(kh, kw)``.
      strides, padding, kernel_dilation, feature_group_count: as ``nn.Conv``.
      options: the op's :class:`~nmfjax.ops.NMFOptions`; the keyword attributes ``iterations``,
        ``epsilon``, ``gradient``, ... replace its fields, as ``NMFConv(3, 8, kernel_size=3, iterations=10)``.
      kernel_init: initialiser of ``u``, whose shape is ``(kh, kw, C / G, I)`` (default Uniform(0, 1));
        ``param_dtype`` is its dtype.
    """

    in_features: int
    out_features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "VALID"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    kernel_init: nn.initializers.Initializer = _UNIFORM
    param_dtype: Any = jnp.float32

    @property
    def geometry(self) -> PatchGeometry:
        """The layer's patches and groups."""
        return PatchGeometry.of(
            self.in_features,
            self.out_features,
            self.kernel_size,
            self.strides,
            self.padding,
            self.kernel_dilation,
            self.feature_group_count,
        )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, C)`` non-negative -> ``(B, H', W', out_features)``: the NMF of every patch, per group."""
        geometry = self.geometry
        kernel = self.param(NMF_KERNEL, self.kernel_init, geometry.kernel_shape, self.param_dtype)
        return nmf_conv(x, kernel, geometry, self.nmf_options)


def nmf_labels(params: Mapping[str, Any], nmf: str = "nmf", other: str = "other") -> Mapping[str, Any]:
    """Labels for ``optax.multi_transform``: ``nmf`` for every :data:`NMF_KERNEL`, ``other`` for the rest.

    Args:
      params: a Linen ``"params"`` tree (nested dicts or a ``FrozenDict``).
      nmf: the label of the NMF weights.
      other: the label of every other parameter.

    Returns:
      A tree of labels of the structure of ``params`` (nested dicts).
    """
    return traverse_util.path_aware_map(lambda path, _: nmf if path[-1] == NMF_KERNEL else other, params)
