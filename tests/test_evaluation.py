"""What nmfjax.evaluation promises on its own: the paper's loss, metric sums that add up over batches,
and the Evaluator's loss and accuracy over a dataset, with its preprocessing hook.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from nmfjax import configuration, evaluation, models, parallel


def test_composite_loss_matches_spec():
    logits = np.random.default_rng(0).normal(size=(5, 10))
    labels = np.array([0, 3, 9, 3, 1])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    y = np.eye(10)[labels]
    expected = (-(y * np.log(p)).sum(-1) + 0.5 * ((p - y) ** 2).sum(-1)) / 1.5
    np.testing.assert_allclose(evaluation.composite_loss(jnp.asarray(logits), jnp.asarray(labels)), expected, rtol=1e-5)


def test_metric_sums_over_batches_are_the_means_over_all_examples():
    rng = np.random.default_rng(0)
    logits, labels = jnp.asarray(rng.normal(size=(7, 10)), jnp.float32), jnp.asarray(rng.integers(0, 10, 7))
    totals = evaluation.no_metrics(parallel.data_mesh())
    for batch in (slice(0, 3), slice(3, 7)):  # unequal batches
        totals = evaluation.add_metrics(totals, evaluation.summed_metrics(logits[batch], labels[batch]))
    means = evaluation.mean_metrics(totals)
    assert means["count"] == 7
    np.testing.assert_allclose(means["loss"], np.mean(evaluation.composite_loss(logits, labels)), rtol=1e-6)
    assert means["accuracy"] == np.sum(np.argmax(logits, -1) == labels) / 7


@pytest.fixture(scope="module")
def network():
    """A tiny CNN+1x1 in evaluation mode with running BatchNorm statistics: each image's logits do not
    depend on the batch it is in.
    """
    config = configuration.default_config()
    config.model.architecture, config.model.batch_norm_statistics = "cnn_1x1", "running"
    model = models.build(configuration.network_spec(config), 0)
    model.eval()
    return model


def _direct(model, pixels, labels):
    logits = model.logits(pixels[:, 2:30, 2:30, :])  # the centre crop of 28
    return float(jnp.mean(evaluation.composite_loss(logits, labels))), float(jnp.mean(jnp.argmax(logits, -1) == labels))


@pytest.mark.parametrize("batch_size", [4, 5])  # 5 leaves a smaller last batch of the 13 images
def test_the_evaluator_gives_the_loss_and_accuracy_of_the_whole_dataset(network, batch_size):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 13).astype(np.int32)
    graphdef, params, batch_stats = models.split_state(network)
    evaluator = evaluation.Evaluator(graphdef, 28, batch_size, parallel.data_mesh())
    result = evaluator.evaluate(params, batch_stats, jnp.asarray(images), jnp.asarray(labels))
    loss, accuracy = _direct(network, jnp.asarray(images, jnp.float32) / 255, jnp.asarray(labels))
    assert result["count"] == 13 and result["accuracy"] == pytest.approx(accuracy)
    np.testing.assert_allclose(result["loss"], loss, rtol=1e-5)
    # The hook sees each batch's pixels in [0, 1] before the crop, and its number.
    darken = lambda pixels, batch_number, factor: pixels * factor  # noqa: E731
    dark = evaluator.evaluate(
        params, batch_stats, jnp.asarray(images), jnp.asarray(labels), preprocess=darken, arguments=(jnp.float32(0.5),)
    )
    loss, _ = _direct(network, jnp.asarray(images, jnp.float32) / 255 * 0.5, jnp.asarray(labels))
    np.testing.assert_allclose(dark["loss"], loss, rtol=1e-5)
