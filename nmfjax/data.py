"""Input pipeline: TFDS datasets decoded once into resident uint8 arrays, and the
paper's augmentation as pure JAX functions that run inside the jitted step
(SPEC section 4).

Train images get a random crop (no padding), a horizontal flip with p = 0.5 and
torchvision-style colour jitter (brightness 0.5, contrast 0.1, saturation 0.1,
hue 0.15, in a random order per image); test images the centre crop. Pixels
are scaled to [0, 1] with no mean/std normalisation: NMF needs non-negative
input.
"""

from __future__ import annotations

import dataclasses

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    image_size: int  # side of the stored square images
    channels: int
    crop_size: int  # default crop (SPEC: 28 of 32 for CIFAR-10, 24 of 28 for MNIST)
    num_classes: int = 10


DATASETS = {
    "cifar10": DatasetInfo(image_size=32, channels=3, crop_size=28),
    "mnist": DatasetInfo(image_size=28, channels=1, crop_size=24),
    "fashion_mnist": DatasetInfo(image_size=28, channels=1, crop_size=24),
}


class DatasetUnavailableError(RuntimeError):
    """The dataset is not in the data directory and could not be prepared."""


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.labels)


def check_dataset(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"config.dataset must be one of {tuple(DATASETS)}, got {name!r}.")
    return DATASETS[name]


def _open_source(name: str, split: str, data_dir: str | None, download: bool):
    """``tfds.data_source`` for the split, downloading and preparing it first if allowed."""
    where = data_dir or "tfds's default data directory"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as missing:  # tfds signals a missing dataset with several exception types
        if not download:
            raise DatasetUnavailableError(
                f"dataset {name!r} (split {split!r}) is not prepared in {where} and config.download is False. "
                f"Set --config.data_dir to a TFDS data directory that holds {name} "
                f"(for the bundled CIFAR-10 subset: --config.data_dir=../shared/tfds), "
                "or allow the download with --config.download=True."
            ) from missing
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=True)
    except Exception as error:
        raise DatasetUnavailableError(
            f"dataset {name!r} is not prepared in {where} and downloading it failed "
            f"({type(error).__name__}: {error}). Downloading needs network access and TensorFlow "
            f"(pip install -e '.[download]'); offline, set --config.data_dir to a TFDS data directory "
            f"that already holds {name} (for the bundled CIFAR-10 subset: --config.data_dir=../shared/tfds)."
        ) from error


def load_split(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    download: bool = True,
    limit: int | None = None,
) -> Split:
    """Reads a split through ``tfds.data_source`` and decodes it once into arrays.

    Args:
      name: a key of :data:`DATASETS`.
      split: a TFDS split name (``"train"``, ``"test"``).
      data_dir: TFDS data directory (``None``: tfds's default).
      download: whether a missing dataset may be downloaded and prepared.
      limit: read only the first ``limit`` examples.

    Returns:
      A :class:`Split` with uint8 images ``(N, H, W, C)`` and int32 labels.
    """
    check_dataset(name)
    source = _open_source(name, split, data_dir, download)
    count = len(source) if limit is None else min(limit, len(source))
    records = [source[index] for index in tqdm(range(count), desc=f"decoding {name} {split}", leave=False)]
    images = np.stack([record["image"] for record in records]).astype(np.uint8)
    return Split(images, np.asarray([record["label"] for record in records], np.int32))


# --- augmentation, on the device ---


def _to_float(images: jax.Array) -> jax.Array:
    """uint8 pixels to float32 in [0, 1]; float images pass unchanged."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    return images.astype(jnp.float32) / 255.0


def center_crop(images: jax.Array, crop_size: int) -> jax.Array:
    """``(B, H, W, C)`` uint8 (or float in [0, 1]) -> ``(B, crop, crop, C)`` float32 in [0, 1]."""
    top = (images.shape[1] - crop_size) // 2
    left = (images.shape[2] - crop_size) // 2
    return _to_float(images[:, top : top + crop_size, left : left + crop_size])


def _grayscale(image: jax.Array) -> jax.Array:
    """torchvision's luma weights; shape ``(H, W, 1)``."""
    return jnp.sum(image * jnp.array([0.299, 0.587, 0.114], image.dtype), axis=-1, keepdims=True)


def _jitter_brightness(image, factor):
    return jnp.clip(image * factor, 0.0, 1.0)


def _jitter_contrast(image, factor):
    mean = jnp.mean(_grayscale(image) if image.shape[-1] == 3 else image)
    return jnp.clip(factor * image + (1 - factor) * mean, 0.0, 1.0)


def _jitter_saturation(image, factor):
    return jnp.clip(factor * image + (1 - factor) * _grayscale(image), 0.0, 1.0)


def _augment_one(key, image, crop_size, flip, brightness, contrast, saturation, hue):
    crop_key, flip_key, order_key, factor_key = jax.random.split(key, 4)
    height, width, channels = image.shape
    top, left = (
        jax.random.randint(k, (), 0, size - crop_size + 1)
        for k, size in zip(jax.random.split(crop_key), (height, width))
    )
    image = jax.lax.dynamic_slice(image, (top, left, 0), (crop_size, crop_size, channels))
    image = _to_float(image)
    if flip:
        image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)

    # torchvision ColorJitter: factors drawn from [max(0, 1 - b), 1 + b] (hue: [-h, h]), applied in a random order.
    low = jnp.array([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
    high = jnp.array([1 + brightness, 1 + contrast, 1 + saturation, hue])
    factors = jax.random.uniform(factor_key, (4,), minval=low, maxval=high)
    jitters = [_jitter_brightness, _jitter_contrast]
    if channels == 3:  # saturation and hue do not exist for grey images
        jitters += [_jitter_saturation, dm_pix.adjust_hue]
    order = jax.random.permutation(order_key, len(jitters))
    branches = [lambda im, j=j, i=i: j(im, factors[i]) for i, j in enumerate(jitters)]
    for position in range(len(jitters)):
        image = jax.lax.switch(order[position], branches, image)
    return image


def augment(key: jax.Array, images: jax.Array, crop_size: int, config) -> jax.Array:
    """The training augmentation of SPEC section 4 for a batch.

    Args:
      key: a ``jax.random.key``.
      images: ``(B, H, W, C)`` uint8.
      crop_size: side of the random crop.
      config: has ``flip`` (bool), ``brightness``, ``contrast``, ``saturation``, ``hue``.

    Returns:
      ``(B, crop, crop, C)`` float32 in [0, 1].
    """
    keys = jax.random.split(key, images.shape[0])
    augment_one = lambda k, image: _augment_one(
        k, image, crop_size, config.flip, config.brightness, config.contrast, config.saturation, config.hue
    )
    return jax.vmap(augment_one)(keys, images)
