"""Input pipeline: decoding into resident arrays and on-device augmentation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from nmfjax import data
from tests.conftest import mocked_tfds

NO_JITTER = ml_collections.ConfigDict(dict(flip=False, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0))
PAPER = ml_collections.ConfigDict(dict(flip=True, brightness=0.5, contrast=0.1, saturation=0.1, hue=0.15))


def test_center_crop_takes_the_middle_and_scales_to_unit_range():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    crop = data.center_crop(jnp.asarray(images), 28)
    np.testing.assert_allclose(crop, images[:, 2:30, 2:30] / 255.0, rtol=1e-6)


def test_random_crop_without_jitter_is_a_window_of_the_image():
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    crops = np.asarray(data.augment(jax.random.key(0), jnp.asarray(images), 28, NO_JITTER))
    offsets = set()
    for image, crop in zip(images / 255.0, crops, strict=True):
        matches = [(t, s) for t in range(5) for s in range(5) if np.allclose(image[t : t + 28, s : s + 28], crop)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1  # offsets differ between images


def test_paper_augmentation_stays_in_range_varies_and_is_reproducible():
    images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    first = data.augment(jax.random.key(3), images, 28, PAPER)
    again = jax.jit(lambda k, x: data.augment(k, x, 28, PAPER))(jax.random.key(3), images)
    other = data.augment(jax.random.key(4), images, 28, PAPER)
    assert first.shape == (16, 28, 28, 3) and first.dtype == jnp.float32
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    np.testing.assert_allclose(first, again, atol=1e-6)
    assert not np.allclose(first, other)


def test_brightness_jitter_scales_pixels():
    images = jnp.full((64, 32, 32, 3), 100, jnp.uint8)
    only_brightness = ml_collections.ConfigDict(dict(NO_JITTER.to_dict(), brightness=0.5))
    out = np.asarray(data.augment(jax.random.key(0), images, 28, only_brightness))
    factors = out[:, 0, 0, 0] / (100 / 255)
    assert 0.5 <= factors.min() < 0.7 and 1.3 < factors.max() <= 1.5
    np.testing.assert_allclose(out, factors[:, None, None, None] * np.ones_like(out) * 100 / 255, rtol=1e-5)


def test_grey_images_get_brightness_and_contrast_only():
    images = jnp.asarray(np.random.default_rng(5).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8))
    out = data.augment(jax.random.key(0), images, 24, PAPER)
    assert out.shape == (4, 24, 24, 1)


def test_missing_dataset_without_download_names_the_remedy(tmp_path):
    with pytest.raises(
        data.DatasetUnavailableError, match=r"not prepared in .*config.download is False.*--config.data_dir"
    ):
        data.load_split("mnist", "train", data_dir=str(tmp_path), download=False)


def test_unknown_dataset_is_rejected_with_the_names_it_is_close_to():
    with pytest.raises(ValueError, match=r"config.dataset='cifar' is not a TFDS dataset \(did you mean cifar10"):
        data.load_split("cifar", "train")


def test_a_tfds_dataset_that_is_not_image_classification_is_refused():
    with pytest.raises(ValueError, match="'squad' is not an image classification dataset.*features are id, title"):
        data.dataset_info("squad")


@pytest.mark.parametrize(
    "name, shape, classes, crop, flip",
    [
        ("cifar10", (32, 32, 3), 10, 28, True),
        ("cifar100", (32, 32, 3), 100, 28, True),
        ("mnist", (28, 28, 1), 10, 24, False),
        ("svhn_cropped", (32, 32, 3), 10, 28, False),
        ("oxford_flowers102", (None, None, 3), 102, None, True),
    ],
)
def test_dataset_info_comes_from_the_builder_without_a_download(tmp_path, name, shape, classes, crop, flip):
    info = data.dataset_info(name, str(tmp_path))  # an empty data directory: nothing downloaded
    assert (info.image_shape, info.num_classes, info.flip) == (shape, classes, flip)
    if crop is None:  # sizes vary: a size must be set
        with pytest.raises(ValueError, match="--config.image_size=N"):
            info.crop_size()
        assert info.crop_size(64) == 56
    else:
        assert info.crop_size() == crop


def test_dataset_info_asks_tfds_once_per_dataset_and_directory_state(tmp_path, monkeypatch):
    calls = []
    builder = tfds.builder
    monkeypatch.setattr(tfds, "builder", lambda *args, **kwargs: calls.append(args) or builder(*args, **kwargs))
    first = data.dataset_info("mnist", str(tmp_path))
    assert data.dataset_info("mnist", str(tmp_path)) == first and len(calls) == 1
    (tmp_path / "mnist").mkdir()  # the dataset now prepared there: tfds reads its info from the directory
    data.dataset_info("mnist", str(tmp_path))
    assert len(calls) == 2


def test_load_split_decodes_into_uint8_arrays_under_mock_data():
    with mocked_tfds(12):
        split = data.load_split("cifar10", "train", limit=5)
    assert split.images.shape == (5, 32, 32, 3) and split.images.dtype == np.uint8
    assert split.labels.shape == (5,) and split.labels.dtype == np.int32


def test_real_cifar10_subset_is_balanced(shared_tfds):
    split = data.load_split("cifar10", "test", data_dir=shared_tfds, download=False)
    assert split.images.shape == (2000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(split.labels), np.full(10, 200))
