"""The paper's four networks (arXiv 2503.20398, section 2.5, Figure 4): CNN, CNMF, CNN+1x1 and CNMF+1x1.

Each network is a stack of blocks. Block ``b``:

1. ReLU, then module a over ``k_b x k_b`` patches that are L1-normalised:
   NMF (:class:`~nmfjax.layers.NMFConv`) or a bias-free convolution
   (:class:`~nmfjax.layers.PatchConv`);
2. BatchNorm where the block has one (while the map is larger than 1x1);
3. in the "+1x1" networks, module b (:class:`MixingConv`): ReLU, L1-normalise
   over channels, a 1x1 convolution with bias initialised to the identity plus
   Uniform(+-0.5e-4) noise, and BatchNorm again where the block has one;
4. 2x2 average pooling where the block has it.

After the last block, a softmax over the channels of the 1x1 map. An
architecture is a choice of module a and of module b (:data:`ARCHITECTURES`);
every field of :class:`NetworkSpec` is a field of ``config.model``
(:func:`nmfjax.configuration.model_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nmfjax import ops
from nmfjax.layers import NMFConv, NMFWeight, PatchConv, PatchConvWeight
from nmfjax.validation import is_positive_int

BATCH_NORM_STATISTICS = ("batch", "running")
_MIXING_INIT_NOISE = 0.5e-4
ModuleDef = Callable[..., nnx.Module]


class MixingParam(nnx.Param):
    """A weight or bias of a 1x1 mixing convolution (module b)."""


class BatchNormParam(nnx.Param):
    """The scale or shift of a BatchNorm layer."""


class BatchNorm(nnx.BatchNorm):
    """PyTorch-default BatchNorm (eps 1e-5, momentum 0.1) that can keep using batch
    statistics in evaluation, as the authors' networks do (``statistics="batch"``).
    With ``"running"`` it follows ``model.train()`` / ``model.eval()`` as usual.
    """

    def __init__(self, num_features: int, *, statistics: str, rngs: nnx.Rngs):
        super().__init__(num_features, momentum=0.9, epsilon=1e-5, rngs=rngs)
        assert self.scale is not None and self.bias is not None  # use_scale and use_bias are on
        self.scale, self.bias = BatchNormParam(self.scale[...]), BatchNormParam(self.bias[...])
        self.statistics = statistics

    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]  # the statistics are chosen on construction
        """``(..., features)`` normalised by the batch's or the running statistics."""
        if self.statistics == "batch":
            return super().__call__(x, use_running_average=False)
        return super().__call__(x)


def _identity_plus_noise(features: int, groups: int) -> nnx.Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        # shape (1, 1, features // groups, features): output o reads input o mod (features // groups) of its group.
        per_group = features // groups
        identity = (jnp.arange(per_group)[:, None] == jnp.arange(features)[None, :] % per_group).astype(dtype)
        noise = jax.random.uniform(key, shape, dtype, -_MIXING_INIT_NOISE, _MIXING_INIT_NOISE)
        return identity.reshape(shape) + noise

    return init


def _small_noise(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -_MIXING_INIT_NOISE, _MIXING_INIT_NOISE)


class MixingConv(nnx.Conv):
    """Module b: a 1x1 convolution over ``features`` channels that starts as the identity
    plus Uniform(+-0.5e-4) noise (weights and bias), so it can remix, and inhibit, the
    positive outputs of module a (paper section 2.4.2). Its kernel and bias are
    :class:`MixingParam` variables.
    """

    def __init__(self, features: int, *, feature_group_count: int = 1, rngs: nnx.Rngs):
        super().__init__(
            features,
            features,
            (1, 1),
            feature_group_count=feature_group_count,
            kernel_init=_identity_plus_noise(features, feature_group_count),
            bias_init=_small_noise,
            rngs=rngs,
        )
        assert self.bias is not None  # use_bias is on
        self.kernel, self.bias = MixingParam(self.kernel[...]), MixingParam(self.bias[...])

    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]  # a 1x1 convolution needs no window
        """``(..., features) -> (..., features)``: each position's channels times the kernel, per group, plus the bias.

        The same map as ``nnx.Conv``, written as one product over the channels: inside the K-step
        scan of training, XLA's CPU backend turned the gradient of a 1x1 ``conv_general_dilated``
        into a generic convolution that made the whole step 1.5x slower; a product compiles to
        one GEMM in any program.
        """
        groups, per_group = self.feature_group_count, self.in_features // self.feature_group_count
        kernel = self.kernel[...].reshape(per_group, groups, self.out_features // groups)
        grouped = x.reshape(*x.shape[:-1], groups, per_group)
        mixed = jnp.einsum("...gc,cgo->...go", grouped, kernel)
        assert self.bias is not None  # use_bias is on
        return mixed.reshape(*x.shape[:-1], self.out_features) + self.bias[...]


def nmf_module(options: ops.NMFOptions) -> ModuleDef:
    """Module a of the NMF networks: :class:`~nmfjax.layers.NMFConv` with the block's options."""
    return functools.partial(NMFConv, options=options)


def conv_module(options: ops.NMFOptions) -> ModuleDef:
    """Module a of the CNNs: :class:`~nmfjax.layers.PatchConv` (the NMF options do not apply)."""
    del options
    return PatchConv


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A network of the paper as the modules its blocks are made of.

    Attributes:
      module_a: given a block's NMF options, the module-a constructor
        ``(in_features, out_features, kernel_size, *, feature_group_count, rngs)``.
      mixing: the module-b constructor ``(features, *, feature_group_count, rngs)``,
        or None for no module b.
    """

    module_a: Callable[[ops.NMFOptions], ModuleDef]
    mixing: ModuleDef | None = None


#: The paper's four networks by name (module a, and the mixing module of the "+1x1" variants).
ARCHITECTURES = {
    "cnn": Architecture(conv_module),
    "cnmf": Architecture(nmf_module),
    "cnn_1x1": Architecture(conv_module, MixingConv),
    "cnmf_1x1": Architecture(nmf_module, MixingConv),
}

#: The learning-rate groups by variable type (module a, module b, BatchNorm), as in the authors' code.
PARAMETER_GROUPS = {
    "module_a": (NMFWeight, PatchConvWeight),
    "mixing": (MixingParam,),
    "batch_norm": (BatchNormParam,),
}


def parameter_group(variable: nnx.Variable) -> str:
    """The learning-rate group of a parameter, by its variable type (see :data:`PARAMETER_GROUPS`).

    Raises:
      TypeError: for a parameter of no group, so that no parameter silently
        takes another group's learning rate.
    """
    for group, variable_types in PARAMETER_GROUPS.items():
        if isinstance(variable, variable_types):
            return group
    raise TypeError(
        f"a parameter of type {type(variable).__name__} belongs to no learning-rate group; "
        f"add its type to nmfjax.models.PARAMETER_GROUPS."
    )


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """Everything that decides a network's structure: ``config.model`` plus the input shape.

    Attributes:
      architecture: the network, ``"cnn"``, ``"cnmf"``, ``"cnn_1x1"`` or ``"cnmf_1x1"`` (:data:`ARCHITECTURES`).
      input_shape: ``(height, width, channels)`` of the (cropped) images.
      kernel_sizes: module a's kernel per block; 0 is "the whole remaining map"
        (block 3 of the paper's networks).
      features: outputs per block (paper: 32, 64, 96, 10); in a config, a last 0 is the data's number of classes.
      pooling: 2x2 average pooling after the block.
      batch_norm: BatchNorm in the block (only while the map is larger than 1x1).
      groups: groups of module a (paper section 3.1).
      mix_groups: groups of module b.
      width: multiplies the outputs of every block but the last (paper's sweep: 1, 2, 4, 8).
      batch_norm_statistics: ``"batch"`` (the authors': also in evaluation) or ``"running"``.
      nmf: options of the NMF op in module a.
      readout_learning: how the last block's NMF weights learn; None: as ``nmf.learning``.
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
    nmf: ops.NMFOptions = ops.NMFOptions()
    readout_learning: str | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"config.model.architecture must be one of {tuple(ARCHITECTURES)}, got {self.architecture!r}."
            )
        blocks = len(self.features)
        for name in ("kernel_sizes", "pooling", "batch_norm", "groups", "mix_groups"):
            if len(getattr(self, name)) != blocks:
                raise ValueError(
                    f"config.model.{name} has {len(getattr(self, name))} entries but config.model.features has "
                    f"{blocks}: give one entry per block."
                )
        for name in ("features", "groups", "mix_groups"):
            if not all(is_positive_int(v) for v in getattr(self, name)):
                raise ValueError(f"config.model.{name} must hold positive ints, got {getattr(self, name)}.")
        if any(not isinstance(k, int) or k < 0 for k in self.kernel_sizes):
            raise ValueError(f"config.model.kernel_sizes must hold ints >= 0 (0: whole map), got {self.kernel_sizes}.")
        if not is_positive_int(self.width):
            raise ValueError(f"config.model.width must be a positive int, got {self.width!r}.")
        if self.batch_norm_statistics not in BATCH_NORM_STATISTICS:
            raise ValueError(
                f"config.model.batch_norm_statistics must be one of {BATCH_NORM_STATISTICS}, "
                f"got {self.batch_norm_statistics!r}."
            )
        try:
            self.block_nmf(-1)
        except (TypeError, ValueError) as error:
            raise type(error)(f"config.model.readout_learning: {error}") from None

    def block_nmf(self, index: int) -> ops.NMFOptions:
        """Block ``index``'s NMF options: ``readout_learning`` replaces the learning rule of
        the last block (when set).
        """
        is_readout = index in (-1, len(self.features) - 1)
        if is_readout and self.readout_learning is not None:
            return self.nmf.replace(learning=self.readout_learning)
        return self.nmf

    @property
    def uses_nmf(self) -> bool:
        """Whether module a of every block is an NMF layer (cnmf, cnmf_1x1)."""
        return ARCHITECTURES[self.architecture].module_a is nmf_module

    @property
    def block_features(self) -> tuple[int, ...]:
        """Outputs per block after the width multiplier (all blocks but the last)."""
        return tuple(f * self.width for f in self.features[:-1]) + (self.features[-1],)


class Block(nnx.Module):
    """One block: module a, BatchNorm, optional module b (mixing) with its BatchNorm, optional pooling."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        module_a: ModuleDef,
        mixing: ModuleDef | None,
        groups: int,
        mix_groups: int,
        batch_norm: bool,
        statistics: str,
        pooling: bool,
        rngs: nnx.Rngs,
    ):
        self.pooling = pooling
        self.module_a = module_a(in_features, out_features, kernel_size, feature_group_count=groups, rngs=rngs)
        self.norm_a = BatchNorm(out_features, statistics=statistics, rngs=rngs) if batch_norm else None
        mixing_module = mixing_norm = None
        if mixing is not None:
            mixing_module = mixing(out_features, feature_group_count=mix_groups, rngs=rngs)
            mixing_norm = BatchNorm(out_features, statistics=statistics, rngs=rngs) if batch_norm else None
        self.mixing, self.norm_b = mixing_module, mixing_norm

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, C) -> (B, H', W', features)``: ReLU, module a, BatchNorm, mixing, BatchNorm, pooling."""
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
    """One of the paper's four networks, from a :class:`NetworkSpec`.

    ``logits(x)`` returns the last block's ``(batch, classes)`` output and
    ``__call__`` the softmax probabilities. Inputs are NHWC images in
    ``[0, 1]`` of shape ``spec.input_shape``.
    """

    def __init__(self, spec: NetworkSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        architecture = ARCHITECTURES[spec.architecture]
        size, _, channels = spec.input_shape
        blocks = []
        for index, kernel_size in enumerate(spec.kernel_sizes):
            kernel_size = kernel_size or size
            if kernel_size > size:
                raise ValueError(
                    f"config.model.kernel_sizes[{index}]={kernel_size} is larger than the {size}x{size} map "
                    f"that block {index + 1} receives; use 0 for the whole map."
                )
            features = spec.block_features[index]
            if channels % spec.groups[index] or features % spec.groups[index]:
                raise ValueError(
                    f"config.model.groups[{index}]={spec.groups[index]} must divide the {channels} inputs and the "
                    f"{features} outputs of block {index + 1}."
                )
            if architecture.mixing is not None and features % spec.mix_groups[index]:
                raise ValueError(
                    f"config.model.mix_groups[{index}]={spec.mix_groups[index]} must divide the {features} "
                    f"outputs of block {index + 1}."
                )
            block = Block(
                channels,
                features,
                kernel_size,
                module_a=architecture.module_a(spec.block_nmf(index)),
                mixing=architecture.mixing,
                groups=spec.groups[index],
                mix_groups=spec.mix_groups[index],
                batch_norm=spec.batch_norm[index],
                statistics=spec.batch_norm_statistics,
                pooling=spec.pooling[index],
                rngs=rngs,
            )
            blocks.append(block)
            size = size - kernel_size + 1
            if spec.pooling[index]:
                size //= 2
            channels = features
        if size != 1:
            raise ValueError(
                f"the last block leaves a {size}x{size} map; config.model.kernel_sizes={spec.kernel_sizes} and "
                f"config.model.pooling={spec.pooling} must reduce the {spec.input_shape[0]}x{spec.input_shape[0]} "
                "input to 1x1 (a kernel size of 0 covers the whole map)."
            )
        self.blocks = nnx.List(blocks)

    def logits(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, C)`` images in [0, 1] -> ``(B, classes)`` logits."""
        for block in self.blocks:
            x = block(x)
        return x.reshape(x.shape[0], -1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, C)`` images in [0, 1] -> ``(B, classes)`` class probabilities."""
        return jax.nn.softmax(self.logits(x), axis=-1)


def build(spec: NetworkSpec, seed: int) -> Network:
    """``Network(spec, rngs=nnx.Rngs(seed))``, its initialisers run as one compiled program rather
    than one small program each (about 90 of them, 6 s of start-up on 2 CPU devices). The values
    are the same.
    """
    return nnx.jit(lambda: Network(spec, rngs=nnx.Rngs(seed)))()


def split_state(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``model`` as its graph, its parameters and its BatchNorm statistics (``nnx.merge`` joins them)."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)  # type: ignore[misc]
    return graphdef, params, batch_stats


def count_parameters(model: nnx.Module, filter_: nnx.filterlib.Filter = nnx.Param) -> int:
    """Number of trainable values (weights, biases, BatchNorm scale and shift)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, filter_)))


def parameters_by_group(model: nnx.Module) -> dict[str, int]:
    """How many trainable values each learning-rate group holds (see :data:`PARAMETER_GROUPS`)."""
    counts = dict.fromkeys(PARAMETER_GROUPS, 0)
    for variable in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
        counts[parameter_group(variable)] += math.prod(variable.shape)
    return counts


def check_buildable(spec: NetworkSpec) -> None:
    """Builds ``spec``'s network from shapes alone (no arrays, no compilation): kernel sizes that do
    not fit the map or group counts that do not divide raise ``ValueError`` or ``TypeError``.
    """
    nnx.eval_shape(lambda: Network(spec, rngs=nnx.Rngs(0)))
