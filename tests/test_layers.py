"""The NNX layers: patch-wise NMFConv against NMFDense on hand-extracted patches; the core behaviours
run with and without jit (chex.variants).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from flax import nnx

from nmfjax import L1Normalize, NMFConv, NMFDense, NMFWeight, ops
from tests.references import conv_equals_dense_on_patches


def test_same_padding_keeps_the_spatial_size():
    conv = NMFConv(3, 5, 5, padding="SAME", rngs=nnx.Rngs(0))
    out = conv(jnp.ones((1, 7, 6, 3)))
    assert out.shape == (1, 7, 6, 5)


def test_dense_normalises_its_input_and_runs_the_op():
    dense = NMFDense(6, 3, iterations=7, epsilon=0.5, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).uniform(0, 5, (4, 6)), jnp.float32)
    expected = ops.nmf(x / x.sum(-1, keepdims=True), ops.positive_weights(dense.kernel[...]), iterations=7, epsilon=0.5)
    np.testing.assert_allclose(dense(x), expected, rtol=1e-6)


def test_kernel_is_initialised_uniform_zero_one():
    kernel = NMFDense(200, 50, rngs=nnx.Rngs(0)).kernel[...]
    assert float(kernel.min()) >= 0 and float(kernel.max()) < 1
    assert abs(float(kernel.mean()) - 0.5) < 0.01


class _Mixed(nnx.Module):
    def __init__(self, rngs):
        self.nmf = NMFConv(3, 4, 3, rngs=rngs)
        self.mix = nnx.Conv(4, 4, (1, 1), rngs=rngs)

    def __call__(self, x):
        return self.mix(self.nmf(x))


def test_nmf_weight_is_a_separate_variable_type_for_its_own_learning_rate():
    model = _Mixed(nnx.Rngs(0))
    nmf_state = nnx.state(model, NMFWeight)
    assert [path for path, _ in nnx.to_flat_state(nmf_state)] == [("nmf", "kernel")]
    assert len(nnx.to_flat_state(nnx.state(model, nnx.Param))) == 3  # NMFWeight is a Param too

    # An optimiser that gives the NMF weight its own learning rate moves only it.
    labels = jax.tree.map(
        lambda v: "nmf" if isinstance(v, NMFWeight) else "other",
        nnx.state(model, nnx.Param),
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    tx = optax.multi_transform({"nmf": optax.sgd(0.1), "other": optax.set_to_zero()}, labels)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before_nmf, before_mix = model.nmf.kernel[...], model.mix.kernel[...]
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 6, 6, 3)), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)
    assert not np.allclose(model.nmf.kernel[...], before_nmf)
    np.testing.assert_array_equal(model.mix.kernel[...], before_mix)


def test_l1_normalize_sums_the_last_axis_to_one():
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (3, 4, 5)))
    np.testing.assert_allclose(L1Normalize()(x).sum(-1), 1.0, rtol=1e-6)


def test_l1_normalize_sums_patches_as_rows():
    # A single group's patches (B, H, W, 1, S): XLA's CPU compiler ran the gradient's sum over S ~20x
    # slower with the size-1 axis before it (30 ms of CNMF+1x1's train step); the op sums rows instead.
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 3, 3, 1, 8)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    gradient = jax.make_jaxpr(lambda x: jax.vjp(ops.l1_normalize, x)[1](g))(x)
    sums = [eqn for eqn in gradient.jaxpr.eqns if eqn.primitive.name == "reduce_sum"]
    assert sums and all(eqn.invars[0].aval.shape in ((18, 8), (18, 1)) for eqn in sums)
    by_formula = jax.vjp(lambda x: x / (x.sum(-1, keepdims=True) + 1e-19), x)
    np.testing.assert_allclose(ops.l1_normalize(x), by_formula[0], rtol=1e-6)
    np.testing.assert_allclose(jax.vjp(ops.l1_normalize, x)[1](g)[0], by_formula[1](g)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: NMFDense(0, 3, rngs=nnx.Rngs(0)), "in_features must be a positive int, got 0"),
        (lambda: NMFDense(4, 3, gradient="exact", rngs=nnx.Rngs(0)), "gradient must be one of"),
        (lambda: NMFDense(4, 3, iterations=0, rngs=nnx.Rngs(0)), "iterations must be a positive int, got 0"),
        (lambda: NMFConv(6, 4, 3, feature_group_count=4, rngs=nnx.Rngs(0)), "feature_group_count=4 must divide"),
        (lambda: NMFConv(6, 4, (3, 3, 3), rngs=nnx.Rngs(0)), "kernel_size must be an int or a pair"),
        (lambda: NMFConv(6, 4, 3, padding="FULL", rngs=nnx.Rngs(0)), "padding must be 'SAME', 'VALID'"),
        (lambda: NMFConv(6, 4, 3, strides=0, rngs=nnx.Rngs(0)), "strides must be a positive int"),
    ],
)
def test_bad_layer_arguments_raise(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


@pytest.mark.parametrize(
    "kernel_size, strides, padding, groups",
    [(3, 1, "VALID", 1), (3, 1, "SAME", 2), (2, 2, "VALID", 1), (3, 2, "SAME", 2)],
)
def test_reconstruct_returns_the_input_where_h_explains_every_patch(kernel_size, strides, padding, groups):
    # With W the identity (one unit per patch value) one update gives h = the normalised patch, so
    # W h scaled back by each patch's sum is the patch itself and the overlap average gives x back.
    channels = 2
    patch_size = kernel_size * kernel_size * channels // groups
    identity = np.tile(np.eye(patch_size, dtype=np.float32), (1, groups))  # (S_g, G * S_g)
    conv = NMFConv(
        channels,
        groups * patch_size,
        kernel_size,
        strides=strides,
        padding=padding,
        feature_group_count=groups,
        iterations=3,
        rngs=nnx.Rngs(0),
    )
    conv.kernel[...] = jnp.asarray(identity.reshape(conv.kernel.shape))
    x = np.random.default_rng(1).uniform(0.1, 1, (2, 7, 7, channels)).astype(np.float32)
    rebuilt = np.asarray(conv.reconstruct(jnp.asarray(x)))
    covered = (
        np.asarray(jax.vjp(conv.grouped_patches, jnp.asarray(x))[1](conv.grouped_patches(jnp.ones_like(x)))[0]) > 0
    )
    assert covered.any()
    np.testing.assert_allclose(rebuilt[covered], x[covered], rtol=1e-5)
    np.testing.assert_array_equal(rebuilt[~covered], 0.0)
    # A generic weight does not explain the patches: the reconstruction differs.
    conv.kernel[...] = jax.random.uniform(jax.random.key(0), conv.kernel.shape)
    assert not np.allclose(np.asarray(conv.reconstruct(jnp.asarray(x)))[covered], x[covered], rtol=1e-2)


class LayerVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        ((3, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
        ((3, 2), (2, 1), ((1, 2), (0, 1)), (1, 1), 1),
        ((2, 3), (1, 2), ((1, 1), (1, 1)), (2, 1), 1),
        ((3, 3), (2, 2), ((1, 0), (2, 1)), (1, 2), 2),
        ((2, 2), (1, 1), ((0, 0), (0, 0)), (1, 1), 4),
    )
    def test_conv_equals_dense_on_hand_extracted_normalised_patches(
        self, kernel_size, strides, padding, dilation, groups
    ):
        conv = NMFConv(
            4,
            8,
            kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=dilation,
            feature_group_count=groups,
            rngs=nnx.Rngs(0),
        )
        x = np.random.default_rng(0).uniform(0, 1, (2, 9, 8, 4)).astype(np.float32)
        conv_equals_dense_on_patches(conv, x, self.variant(lambda x: conv(x)))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("approx", "unrolled", "implicit")
    def test_conv_gradients_reach_kernel_and_input(self, gradient):
        conv = NMFConv(3, 4, 3, strides=2, gradient=gradient, iterations=5, rngs=nnx.Rngs(0))
        x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 7, 7, 3)), jnp.float32)
        target = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4)), jnp.float32)
        graphdef, params = nnx.split(conv)

        def loss(params, x):
            return jnp.sum(target * nnx.merge(graphdef, params)(x))

        kernel_grads, input_grads = self.variant(jax.grad(loss, argnums=(0, 1)))(params, x)
        chex.assert_tree_all_finite((kernel_grads, input_grads))
        chex.assert_trees_all_equal_shapes(kernel_grads, params)
        assert float(jnp.abs(kernel_grads["kernel"][...]).max()) > 0
        assert float(jnp.abs(input_grads).max()) > 0

    @chex.variants(with_jit=True, without_jit=True)
    def test_the_layers_check_their_input_shapes_at_trace_time(self):
        conv = NMFConv(3, 4, 3, rngs=nnx.Rngs(0))
        dense = NMFDense(6, 2, rngs=nnx.Rngs(0))
        with pytest.raises(
            ValueError, match=r"NMFConv expects NHWC inputs with in_features=3 channels, got shape \(7, 7, 3\)"
        ):
            self.variant(lambda x: conv(x))(jnp.ones((7, 7, 3)))
        with pytest.raises(ValueError, match=r"NMFConv expects NHWC .* got shape \(1, 7, 7, 2\)"):
            self.variant(lambda x: conv(x))(jnp.ones((1, 7, 7, 2)))
        with pytest.raises(
            ValueError, match=r"NMFDense expects inputs with in_features=6 on the last axis, got shape \(2, 5\)"
        ):
            self.variant(lambda x: dense(x))(jnp.ones((2, 5)))
