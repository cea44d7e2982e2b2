"""The Linen layers (nmfjax.linen): equal to the NNX layers, and trained inside a plain Linen model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state
from jax.test_util import check_grads

from nmfjax import layers, linen, ops

CONV_CASES = {
    "plain": dict(kernel_size=3),
    "strided, padded, grouped": dict(kernel_size=(3, 2), strides=2, padding="SAME", feature_group_count=2),
    "dilated": dict(kernel_size=2, kernel_dilation=2, padding=1),
}


def _nnx_and_linen(kind, mode, **arguments):
    options = ops.NMFOptions(iterations=6, gradient=mode)
    if kind == "dense":
        nnx_layer = layers.NMFDense(12, 5, options=options, rngs=nnx.Rngs(0))
        linen_layer = linen.NMFDense(12, 5, options=options)
        x = jax.random.uniform(jax.random.key(1), (7, 12))
    else:
        nnx_layer = layers.NMFConv(4, 6, options=options, rngs=nnx.Rngs(0), **arguments)
        linen_layer = linen.NMFConv(4, 6, options=options, **arguments)
        x = jax.random.uniform(jax.random.key(1), (2, 9, 9, 4))
    params = {linen.NMF_KERNEL: nnx_layer.kernel[...]}  # the same weights in both
    assert jax.tree.map(jnp.shape, linen_layer.init(jax.random.key(2), x)["params"]) == jax.tree.map(jnp.shape, params)
    return nnx_layer, linen_layer, params, x


def test_linen_layers_take_the_option_fields_the_nnx_layers_take():
    """``NMFConv(3, 8, kernel_size=3, iterations=10)`` as in NNX: every NMFOptions field is a keyword,
    replacing that field of ``options``; the outputs equal the NNX layer's with the same keywords.
    """
    fields = {
        "iterations": 7,
        "epsilon": 0.25,
        "gradient": "implicit",
        "learning": "backprop",
        "adjoint_iterations": 9,
        "precision": "bfloat16",
        "kernel": "xla",
        "unroll": True,
        "check_inputs": True,
    }
    assert set(fields) == {field.name for field in dataclasses.fields(ops.NMFOptions)}
    base = ops.NMFOptions(iterations=3, epsilon=0.5)
    for name, value in fields.items():
        layer = linen.NMFConv(3, 8, kernel_size=3, options=base, **{name: value})
        assert layer.nmf_options == base.replace(**{name: value}), name
    assert linen.NMFDense(4, 2, options=base, epsilon=None).nmf_options.epsilon is None  # None is a value
    assert linen.NMFDense(4, 2, options=base).nmf_options == base
    x = jax.random.uniform(jax.random.key(1), (2, 6, 6, 3))
    nnx_layer = layers.NMFConv(3, 8, kernel_size=3, iterations=10, rngs=nnx.Rngs(0))
    linen_layer = linen.NMFConv(3, 8, kernel_size=3, iterations=10)
    params = {"params": {linen.NMF_KERNEL: nnx_layer.kernel[...]}}
    np.testing.assert_allclose(linen_layer.apply(params, x), nnx_layer(x), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="iterations"):
        linen.NMFDense(4, 2, iterations=0).init(jax.random.key(0), jnp.ones((1, 4)))


# Every gradient mode on the dense layer and the convolution with most options; the other geometries in one.
EQUALITY_CASES = [
    *[("dense", mode) for mode in ops.GRADIENTS],
    *[("strided, padded, grouped", mode) for mode in ops.GRADIENTS],
    *[(case, "approx") for case in CONV_CASES if case != "strided, padded, grouped"],
]


@pytest.mark.parametrize("case, mode", EQUALITY_CASES)
def test_a_linen_layer_equals_the_nnx_layer_in_outputs_and_gradients(case, mode):
    kind = "dense" if case == "dense" else "conv"
    nnx_layer, linen_layer, params, x = _nnx_and_linen(kind, mode, **CONV_CASES.get(case, {}))
    upstream = jax.random.normal(jax.random.key(3), nnx_layer(x).shape)

    def nnx_loss(layer, x):
        return jnp.sum(layer(x) * upstream)

    def linen_loss(kernel, x):
        return jnp.sum(linen_layer.apply({"params": {linen.NMF_KERNEL: kernel}}, x) * upstream)

    kernel = params[linen.NMF_KERNEL]
    np.testing.assert_array_equal(linen_layer.apply({"params": params}, x), nnx_layer(x))
    layer_grads, x_grad = nnx.grad(nnx_loss, argnums=(0, 1))(nnx_layer, x)
    linen_grads = jax.grad(linen_loss, argnums=(0, 1))(kernel, x)
    for ours, theirs in zip(linen_grads, (layer_grads["kernel"][...], x_grad), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)


def test_l1_normalize_and_bad_arguments_as_the_nnx_layers():
    x = jax.random.uniform(jax.random.key(0), (3, 5))
    np.testing.assert_array_equal(linen.L1Normalize().apply({}, x), layers.L1Normalize()(x))
    with pytest.raises(ValueError, match="feature_group_count=3 must divide in_features=4"):
        linen.NMFConv(4, 6, 3, feature_group_count=3).init(jax.random.key(0), jnp.ones((1, 5, 5, 4)))
    with pytest.raises(ValueError, match="NMFConv expects NHWC inputs with in_features=4 channels"):
        linen.NMFConv(4, 6, 3).init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    with pytest.raises(ValueError, match="in_features=12 on the last axis"):
        linen.NMFDense(12, 5).init(jax.random.key(0), jnp.ones((2, 11)))


class SmallNet(nn.Module):
    """A Linen model of the kind nmfjax's users build: convolution, BatchNorm, convolutional NMF, readout."""

    options: ops.NMFOptions = ops.NMFOptions(iterations=5)

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(6, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = linen.NMFConv(6, 8, 3, options=self.options)(nn.relu(x))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


def _batch(dtype=jnp.float32):
    images = jax.random.uniform(jax.random.key(0), (16, 10, 10, 3), dtype)
    labels = jnp.arange(16) % 4
    return images, labels


def test_a_linen_model_with_an_nmf_layer_trains_in_a_plain_train_step():
    model = SmallNet()
    images, labels = _batch()
    variables = model.init(jax.random.key(1), images, train=False)
    params = variables["params"]
    labels_tree = linen.nmf_labels(params)
    assert labels_tree["NMFConv_0"] == {linen.NMF_KERNEL: "nmf"} and labels_tree["Conv_0"]["kernel"] == "other"
    optimizer = optax.multi_transform({"nmf": optax.adam(3e-2), "other": optax.adam(3e-2)}, labels_tree)

    class TrainState(train_state.TrainState):
        batch_stats: dict

    state = TrainState.create(apply_fn=model.apply, params=params, tx=optimizer, batch_stats=variables["batch_stats"])

    @jax.jit
    def train_step(state, images, labels):
        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), loss

    losses = []
    for _ in range(30):
        state, loss = train_step(state, images, labels)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, params)
    assert moved["NMFConv_0"][linen.NMF_KERNEL] > 0 and moved["Conv_0"]["kernel"] > 0  # both groups learn
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, state.batch_stats, variables["batch_stats"]))


def test_the_gradient_through_a_linen_model_passes_check_grads(x64):
    model = SmallNet(ops.NMFOptions(iterations=4, gradient="unrolled"))  # the exact gradient
    images, labels = _batch(jnp.float64)
    variables = model.init(jax.random.key(1), images[:4], train=False)

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images[:4], train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[:4]).mean()

    params = jax.tree.map(lambda value: value.astype(jnp.float64), variables["params"])
    check_grads(loss, (params,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
