"""The paper's four networks (SPEC section 3): CNN, CNMF, CNN+1x1 and CNMF+1x1.

Each network is a stack of blocks. Block ``b``:

1. ReLU, then module a over ``k_b x k_b`` patches that are L1-normalised:
   NMF (:class:`~nmfjax.layers.NMFConv`) or a bias-free convolution
   (:class:`~nmfjax.layers.PatchConv`);
2. BatchNorm where the block has one (SPEC: while the map is larger than 1x1);
3. in the "+1x1" networks, module b: ReLU, L1-normalise over channels, a 1x1
   convolution with bias initialised to the identity plus Uniform(+-0.5e-4)
   noise, and BatchNorm again where the block has one;
4. 2x2 average pooling where the block has it.

After the last block, a softmax over the channels of the 1x1 map.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nmfjax import ops
from nmfjax.layers import NMFConv, PatchConv

# name -> (module a, with the 1x1 mixing module)
ARCHITECTURES = {
    "cnn": ("conv", False),
    "cnmf": ("nmf", False),
    "cnn_1x1": ("conv", True),
    "cnmf_1x1": ("nmf", True),
}
BATCH_NORM_STATISTICS = ("batch", "running")
_MIXING_INIT_NOISE = 0.5e-4


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Everything that decides a network's structure; built from a config by :func:`network_spec`.

    ``kernel_sizes`` entries of 0 mean "the whole remaining map" (block 3 of SPEC).
    """

    architecture: str = "cnmf_1x1"
    input_shape: tuple[int, int, int] = (28, 28, 3)
    kernel_sizes: tuple[int, ...] = (5, 5, 0, 1)
    features: tuple[int, ...] = (32, 64, 96, 10)
    pooling: tuple[bool, ...] = (True, True, False, False)
    batch_norm: tuple[bool, ...] = (True, True, False, False)
    groups: tuple[int, ...] = (1, 1, 1, 1)
    mix_groups: tuple[int, ...] = (1, 1, 1, 1)
    width: int = 1
    batch_norm_statistics: str = "batch"
    iterations: int = 20
    epsilon: float | None = None
    gradient: str = "approx"
    learning: str = "backprop"
    readout_learning: str | None = None  # the last block's NMF layer; None: as ``learning``
    adjoint_iterations: int | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"config.model must be one of {tuple(ARCHITECTURES)}, got {self.architecture!r}.")
        blocks = len(self.features)
        for name in ("kernel_sizes", "pooling", "batch_norm", "groups", "mix_groups"):
            if len(getattr(self, name)) != blocks:
                raise ValueError(
                    f"config.{name} has {len(getattr(self, name))} entries but config.features has {blocks}: "
                    "give one entry per block."
                )
        for name in ("features", "groups", "mix_groups"):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in getattr(self, name)):
                raise ValueError(f"config.{name} must hold positive ints, got {getattr(self, name)}.")
        if any(not isinstance(k, int) or k < 0 for k in self.kernel_sizes):
            raise ValueError(f"config.kernel_sizes must hold ints >= 0 (0: whole map), got {self.kernel_sizes}.")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"config.width must be a positive int, got {self.width!r}.")
        if self.batch_norm_statistics not in BATCH_NORM_STATISTICS:
            raise ValueError(
                f"config.batch_norm_statistics must be one of {BATCH_NORM_STATISTICS}, "
                f"got {self.batch_norm_statistics!r}."
            )
        try:
            for learning in (self.learning, self.block_learning(-1)):
                ops.check_nmf_options(self.iterations, self.epsilon, self.gradient, learning, self.adjoint_iterations)
        except (TypeError, ValueError) as error:
            raise type(error)(f"config.nmf: {error}") from None

    def block_learning(self, index: int) -> str:
        """How block ``index``'s NMF weights learn: ``readout_learning`` for the last block
        (when set), ``learning`` for the others."""
        is_readout = index in (-1, len(self.features) - 1)
        return self.readout_learning if is_readout and self.readout_learning is not None else self.learning

    @property
    def uses_nmf(self) -> bool:
        """Whether module a of every block is an NMF layer (cnmf, cnmf_1x1)."""
        return ARCHITECTURES[self.architecture][0] == "nmf"

    @property
    def block_features(self) -> tuple[int, ...]:
        """Outputs per block after the width multiplier (all blocks but the last)."""
        return tuple(f * self.width for f in self.features[:-1]) + (self.features[-1],)


class BatchNorm(nnx.BatchNorm):
    """PyTorch-default BatchNorm (eps 1e-5, momentum 0.1) that can keep using batch
    statistics in evaluation, as the authors' networks do (``statistics="batch"``).
    With ``"running"`` it follows ``model.train()`` / ``model.eval()`` as usual."""

    def __init__(self, num_features: int, *, statistics: str, rngs: nnx.Rngs):
        super().__init__(num_features, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.statistics = statistics

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.statistics == "batch":
            return super().__call__(x, use_running_average=False)
        return super().__call__(x)


def _identity_plus_noise(features: int, groups: int):
    def init(key, shape, dtype=jnp.float32):
        # shape (1, 1, features // groups, features): output o reads input o mod (features // groups) of its group.
        per_group = features // groups
        identity = (jnp.arange(per_group)[:, None] == jnp.arange(features)[None, :] % per_group).astype(dtype)
        noise = jax.random.uniform(key, shape, dtype, -_MIXING_INIT_NOISE, _MIXING_INIT_NOISE)
        return identity.reshape(shape) + noise

    return init


def _small_noise(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -_MIXING_INIT_NOISE, _MIXING_INIT_NOISE)


class Block(nnx.Module):
    """One block: module a, BatchNorm, optional 1x1 mixing module, optional pooling."""

    def __init__(
        self,
        spec: NetworkSpec,
        index: int,
        in_features: int,
        kernel_size: int,
        *,
        rngs: nnx.Rngs,
    ):
        module, mixing = ARCHITECTURES[spec.architecture]
        features = spec.block_features[index]
        groups = spec.groups[index]
        self.pooling = spec.pooling[index]
        if module == "nmf":
            self.module_a = NMFConv(
                in_features,
                features,
                kernel_size,
                feature_group_count=groups,
                iterations=spec.iterations,
                epsilon=spec.epsilon,
                gradient=spec.gradient,
                learning=spec.block_learning(index),
                adjoint_iterations=spec.adjoint_iterations,
                rngs=rngs,
            )
        else:
            self.module_a = PatchConv(in_features, features, kernel_size, feature_group_count=groups, rngs=rngs)
        use_norm = spec.batch_norm[index]
        statistics = spec.batch_norm_statistics
        self.norm_a = BatchNorm(features, statistics=statistics, rngs=rngs) if use_norm else None
        mixing_module = mixing_norm = None
        if mixing:
            mix_groups = spec.mix_groups[index]
            if features % mix_groups:
                raise ValueError(
                    f"config.mix_groups[{index}]={mix_groups} must divide the {features} outputs of block {index + 1}."
                )
            mixing_module = nnx.Conv(
                features,
                features,
                (1, 1),
                feature_group_count=mix_groups,
                kernel_init=_identity_plus_noise(features, mix_groups),
                bias_init=_small_noise,
                rngs=rngs,
            )
            mixing_norm = BatchNorm(features, statistics=statistics, rngs=rngs) if use_norm else None
        self.mixing = mixing_module
        self.norm_b = mixing_norm

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.module_a(nnx.relu(x))
        if self.norm_a is not None:
            x = self.norm_a(x)
        if self.mixing is not None:
            x = self.mixing(ops.l1_normalize(nnx.relu(x)))
            if self.norm_b is not None:
                x = self.norm_b(x)
        if self.pooling:
            x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        return x


class Network(nnx.Module):
    """One of the four networks of SPEC section 3, from a :class:`NetworkSpec`.

    ``logits(x)`` returns the last block's ``(batch, classes)`` output and
    ``__call__`` the softmax probabilities of SPEC. Inputs are NHWC images in
    ``[0, 1]`` of shape ``spec.input_shape``.
    """

    def __init__(self, spec: NetworkSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        size, _, channels = spec.input_shape
        blocks = []
        for index, kernel_size in enumerate(spec.kernel_sizes):
            kernel_size = kernel_size or size
            if kernel_size > size:
                raise ValueError(
                    f"config.kernel_sizes[{index}]={kernel_size} is larger than the {size}x{size} map "
                    f"that block {index + 1} receives; use 0 for the whole map."
                )
            blocks.append(Block(spec, index, channels, kernel_size, rngs=rngs))
            size = size - kernel_size + 1
            if spec.pooling[index]:
                size //= 2
            channels = spec.block_features[index]
        if size != 1:
            raise ValueError(
                f"the last block leaves a {size}x{size} map; config.kernel_sizes={spec.kernel_sizes} and "
                f"config.pooling={spec.pooling} must reduce the {spec.input_shape[0]}x{spec.input_shape[0]} "
                "input to 1x1 (a kernel size of 0 covers the whole map)."
            )
        self.blocks = nnx.List(blocks)

    def logits(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x.reshape(x.shape[0], -1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.softmax(self.logits(x), axis=-1)


def count_parameters(model: nnx.Module, filter_=nnx.Param) -> int:
    """Number of trainable values (weights, biases, BatchNorm scale and shift)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, filter_)))


def parameter_group(path: Sequence) -> str:
    """The learning-rate group of a parameter path: ``"module_a"``, ``"mixing"`` or ``"batch_norm"``."""
    names = [str(getattr(entry, "key", entry)) for entry in path]
    for group in ("module_a", "mixing"):
        if group in names:
            return group
    return "batch_norm"
