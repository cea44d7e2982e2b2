"""The paper's four networks (section 2.5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nmfjax import models, ops
from nmfjax.layers import NMFConv, PatchConv
from tests.references import hand_patches


@pytest.mark.parametrize(
    "architecture, parameters",
    [("cnmf_1x1", 167_886), ("cnmf", 153_056), ("cnn_1x1", 167_886), ("cnn", 153_056)],
)
def test_default_parameter_counts_equal_spec(architecture, parameters):
    model = models.Network(models.NetworkSpec(architecture=architecture), rngs=nnx.Rngs(0))
    assert models.count_parameters(model) == parameters


@pytest.mark.parametrize("architecture", list(models.ARCHITECTURES))
def test_network_outputs_probabilities(architecture):
    model = models.Network(
        models.NetworkSpec(architecture=architecture, nmf=ops.NMFOptions(iterations=3)), rngs=nnx.Rngs(0)
    )
    images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 3))
    probabilities = model(images)
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    module_type = NMFConv if architecture.startswith("cnmf") else PatchConv
    assert all(isinstance(block.module_a, module_type) for block in model.blocks)
    assert all((block.mixing is not None) == architecture.endswith("1x1") for block in model.blocks)


def test_mixing_starts_as_identity_plus_small_noise():
    model = models.Network(models.NetworkSpec(mix_groups=(4, 4, 4, 1)), rngs=nnx.Rngs(0))
    mixing = model.blocks[1].mixing  # 64 channels in 4 groups of 16
    kernel = np.asarray(mixing.kernel[...])[0, 0]  # (16, 64)
    identity = (np.arange(16)[:, None] == np.arange(64)[None, :] % 16).astype(np.float32)
    assert np.abs(kernel - identity).max() <= 0.5e-4
    assert 0 < np.abs(np.asarray(mixing.bias[...])).max() <= 0.5e-4


@pytest.mark.parametrize("groups", [1, 4])
def test_mixing_is_the_1x1_convolution_of_its_kernel_and_bias(groups):
    mixing = models.MixingConv(16, feature_group_count=groups, rngs=nnx.Rngs(0))
    mixing.kernel[...] = jax.random.normal(jax.random.key(1), mixing.kernel.shape)
    mixing.bias[...] = jax.random.normal(jax.random.key(2), mixing.bias.shape)
    x = jax.random.uniform(jax.random.key(3), (2, 5, 5, 16))
    convolution = jax.lax.conv_general_dilated(
        x,
        mixing.kernel[...],
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(mixing(x), convolution + mixing.bias[...], rtol=1e-5, atol=1e-5)


def test_width_and_groups_change_the_counts_as_expected():
    spec = models.NetworkSpec(architecture="cnn_1x1", width=2, groups=(1, 4, 4, 1), mix_groups=(2, 2, 2, 1))
    model = models.Network(spec, rngs=nnx.Rngs(0))
    convolutions = 5 * 5 * 3 * 64 + 5 * 5 * (64 // 4) * 128 + 4 * 4 * (128 // 4) * 192 + 192 * 10
    mixing = (64 * 32 + 64) + (128 * 64 + 128) + (192 * 96 + 192) + (10 * 10 + 10)
    batch_norm = 2 * 2 * (64 + 128)
    assert models.count_parameters(model) == convolutions + mixing + batch_norm


def test_batch_statistics_are_used_in_evaluation_when_asked():
    images = jax.random.uniform(jax.random.key(1), (6, 28, 28, 3))
    outputs = {}
    for statistics in models.BATCH_NORM_STATISTICS:
        model = models.Network(
            models.NetworkSpec(architecture="cnn", batch_norm_statistics=statistics), rngs=nnx.Rngs(0)
        )
        model.train()
        training = model(images)
        model.eval()
        outputs[statistics] = (training, model(images))
    np.testing.assert_allclose(outputs["batch"][0], outputs["batch"][1], rtol=1e-6)
    assert not np.allclose(outputs["running"][0], outputs["running"][1], rtol=1e-3)


def test_patch_conv_is_a_linear_map_of_normalised_patches():
    conv = PatchConv(4, 6, 3, strides=2, padding=1, feature_group_count=2, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).uniform(0, 1, (2, 7, 7, 4)).astype(np.float32)
    patches = hand_patches(x, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1))  # (..., 3, 3, 4)
    kernel = np.asarray(conv.kernel[...])  # (3, 3, 2, 6)
    expected = []
    for g in range(2):
        group = patches[..., 2 * g : 2 * g + 2].reshape(*patches.shape[:3], -1)
        group /= group.sum(-1, keepdims=True) + 1e-19
        expected.append(group @ kernel[..., 3 * g : 3 * g + 3].reshape(-1, 3))
    np.testing.assert_allclose(conv(jnp.asarray(x)), np.concatenate(expected, -1), rtol=1e-5, atol=1e-7)


def test_parameter_groups_cover_module_a_mixing_and_batch_norm():
    model = models.Network(models.NetworkSpec(), rngs=nnx.Rngs(0))
    groups = models.parameters_by_group(model)
    assert groups == {"module_a": 2400 + 51200 + 98304 + 960, "mixing": 14638, "batch_norm": 384}
    assert models.parameters_by_group(models.Network(models.NetworkSpec(architecture="cnn"), rngs=nnx.Rngs(0))) == {
        "module_a": 2400 + 51200 + 98304 + 960,
        "mixing": 0,
        "batch_norm": 192,
    }


def test_a_parameter_of_no_group_is_an_error_not_a_silent_default():
    with pytest.raises(TypeError, match="a parameter of type Param belongs to no learning-rate group"):
        models.parameter_group(nnx.Param(jnp.zeros(3)))


@pytest.mark.parametrize(
    "spec, match",
    [
        (dict(architecture="resnet"), "config.model.architecture must be one of"),
        (dict(kernel_sizes=(5, 5, 0)), "config.model.kernel_sizes has 3 entries but config.model.features has 4"),
        (dict(pooling=(True,)), "config.model.pooling has 1 entries"),
        (dict(kernel_sizes=(5, 5, 3, 1)), "leaves a 2x2 map"),
        (dict(kernel_sizes=(5, 5, 9, 1)), r"config.model.kernel_sizes\[2\]=9 is larger than the 4x4 map"),
        (dict(batch_norm_statistics="none"), "config.model.batch_norm_statistics must be one of"),
        (dict(groups=(1, 3, 1, 1)), r"config.model.groups\[1\]=3 must divide the 32 inputs and the 64 outputs"),
        (dict(readout_learning="hebb"), "config.model.readout_learning: learning must be one of"),
    ],
)
def test_bad_specs_name_the_config_field(spec, match):
    with pytest.raises(ValueError, match=match):
        models.Network(models.NetworkSpec(**spec), rngs=nnx.Rngs(0))
