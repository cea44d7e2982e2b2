"""Input pipeline: what a dataset is (:func:`dataset_info`: any TFDS image
classification dataset by name, or a folder of one's own images), its splits
decoded once into resident uint8 arrays, and the paper's augmentation as pure
JAX functions that run inside the jitted step (arXiv 2503.20398, section 2.6).

Train images get a random crop (no padding), a horizontal flip with p = 0.5 and
torchvision-style colour jitter (brightness 0.5, contrast 0.1, saturation 0.1,
hue 0.15, in a random order per image); test images the centre crop. Pixels
are scaled to [0, 1] with no mean/std normalisation: NMF needs non-negative
input.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import difflib
import functools
import pathlib
import socket
import ssl
import urllib.parse
from collections.abc import Iterator

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import requests
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from tqdm.auto import tqdm

from nmfjax import image_folder
from nmfjax.errors import ConfigError, DatasetUnavailableError, causes, close_directory_hint, describe

#: ``config.dataset`` for a folder of one's own images (:mod:`nmfjax.image_folder`).
IMAGE_FOLDER = "image_folder"

#: Where tfds downloads these datasets from, where it is not their homepage's host.
_DOWNLOAD_HOSTS = {
    "cifar10": "www.cs.toronto.edu",
    "mnist": "storage.googleapis.com",
    "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
}

#: Datasets of digits, letters and characters, where a mirror image is another symbol (no flips by default).
NO_FLIP_DATASETS = ("mnist", "emnist", "kmnist", "svhn_cropped", "omniglot", "binary_alpha_digits")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What nmfjax needs to know of an image classification dataset, read without a download."""

    name: str  # config.dataset
    image_shape: tuple[int | None, int | None, int]  # (height, width, channels) as stored; None: sizes vary
    class_names: tuple[str, ...]
    download_host: str | None = None  # where tfds downloads it from; None: nothing to download
    flip: bool = True  # the default of config.augment.flip
    image_key: str = "image"  # the features of a TFDS record that hold the image and the label
    label_key: str = "label"

    @property
    def channels(self) -> int:
        """How many channels the images have (1 for grey, 3 for colour)."""
        return self.image_shape[2]

    @property
    def num_classes(self) -> int:
        """How many classes the labels name."""
        return len(self.class_names)

    def image_size(self, resize: int | None = None) -> tuple[int, int]:
        """``(height, width)`` of the images a run sees: ``resize x resize`` (``config.image_size``),
        else as stored; a :class:`~nmfjax.errors.ConfigError` where stored sizes vary and no size is set.
        """
        if resize is not None:
            return resize, resize
        height, width, _ = self.image_shape
        if height is None or width is None:
            raise ConfigError(
                f"the images of {self.name} differ in size: set --config.image_size=N to resize them to N x N "
                "(e.g. 32)."
            )
        return height, width

    def crop_size(self, resize: int | None = None) -> int:
        """The default crop: 7/8 of the shorter side, the paper's 28 of 32 (and the authors' 24 of 28 for MNIST)."""
        return min(self.image_size(resize)) * 7 // 8


def _base_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


def _tfds_info(name: str, data_dir: str | None) -> DatasetInfo:
    """A TFDS dataset's info from its builder (no download); a ConfigError unless it is image classification."""
    in_dir = data_dir if data_dir is not None and pathlib.Path(data_dir).expanduser().is_dir() else None
    prepared = in_dir is not None and (pathlib.Path(in_dir).expanduser() / _base_name(name)).is_dir()
    return _builder_info(name, in_dir, prepared)


# A run asks for its dataset's info several times (validation, defaults, each split), and tfds's answer
# (about 0.2 s) can only change when the dataset appears in the directory, which is part of the key.
@functools.lru_cache(maxsize=32)
def _builder_info(name: str, in_dir: str | None, prepared: bool) -> DatasetInfo:
    known = tfds.list_builders(with_community_datasets=False)
    # A name tfds does not know may still be a dataset prepared in data_dir (tfds reads its info from there);
    # anything else is refused before tfds looks for it on the network.
    if _base_name(name) not in known and not prepared:
        close = difflib.get_close_matches(_base_name(name), known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"config.dataset={name!r} is not a TFDS dataset{hint}: use a name of tfds.list_builders() "
            f"(e.g. cifar10, cifar100, mnist, svhn_cropped), or {IMAGE_FOLDER!r} for a folder of images."
        )
    try:
        with _absl_errors_only():
            info = tfds.builder(name, data_dir=in_dir).info
    except Exception as error:  # a builder config that does not exist, a damaged dataset_info.json
        raise ConfigError(f"config.dataset={name!r}: tfds cannot read its info ({describe(error)}).") from None
    features = info.features
    image_key, label_key = info.supervised_keys if _is_pair(info.supervised_keys) else ("image", "label")
    image, label = (features[key] if key in features else None for key in (image_key, label_key))
    if not (isinstance(image, tfds.features.Image) and isinstance(label, tfds.features.ClassLabel)):
        raise ConfigError(
            f"config.dataset={name!r} is not an image classification dataset: nmfjax needs one image and one "
            f"class label per example, and its features are {', '.join(features.keys())}."
        )
    height, width, channels = image.shape
    host = _DOWNLOAD_HOSTS.get(_base_name(name)) or urllib.parse.urlparse(info.homepage or "").hostname
    return DatasetInfo(
        name=name,
        image_shape=(height, width, channels or 3),
        class_names=tuple(label.names),
        download_host=host,
        flip=_base_name(name) not in NO_FLIP_DATASETS,
        image_key=image_key,
        label_key=label_key,
    )


def _is_pair(keys) -> bool:
    return isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(key, str) for key in keys)


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """What nmfjax needs to know of ``config.dataset``: a TFDS name, or :data:`IMAGE_FOLDER` with the folder
    in ``data_dir``.

    Raises:
      ConfigError: ``name`` is not a TFDS dataset, or not image classification.
      DatasetUnavailableError: an image folder that is missing or not in the expected layout.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"config.dataset must be a TFDS dataset name or {IMAGE_FOLDER!r}, got {name!r}.")
    if name == IMAGE_FOLDER:
        contents = image_folder.scan(data_dir)
        return DatasetInfo(name, contents.image_shape, contents.class_names, download_host=None)
    return _tfds_info(name, data_dir)


#: How many seconds the one try to reach a dataset's host may take before a download
#: (so that offline a run fails at once).
REACHABLE_TIMEOUT = 5.0


def check_host_reachable(host: str, timeout: float = REACHABLE_TIMEOUT) -> None:
    """One short try to open a connection to ``host``; ``ConnectionError`` naming it if none opens.

    tfds's downloader retries a missing network for minutes; this answers in
    seconds, before anything is written into the data directory. Behind a proxy
    (``HTTPS_PROXY`` or ``ALL_PROXY``, unless ``NO_PROXY`` names the host: the
    settings requests, and so tfds's downloader, follow) it asks the proxy to
    open the connection (HTTP ``CONNECT``), the way the download will.
    """
    url = f"https://{host}"
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    try:
        if proxy is None:
            socket.create_connection((host, 443), timeout=timeout).close()
        else:
            _connect_through(proxy, host, timeout)
    except OSError as error:
        through = f" through the proxy {_without_password(proxy)}" if proxy else ""
        raise ConnectionError(f"cannot reach {host}{through} ({describe(error)})") from error


def _without_password(proxy: str) -> str:
    parsed = urllib.parse.urlsplit(proxy)
    if parsed.password is None:
        return proxy
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")).geturl()


def _connect_through(proxy: str, host: str, timeout: float) -> None:
    """Asks an HTTP(S) proxy to ``CONNECT`` to ``host``:443; ``ConnectionError`` unless it answers 2xx."""
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parsed.scheme not in ("http", "https"):
        return  # a SOCKS proxy: requests needs an extra module for it, and tfds reports its own failure
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    request = f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n"
    if parsed.username is not None:
        credentials = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
        request += f"Proxy-Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"
    with socket.create_connection((parsed.hostname, port), timeout=timeout) as connection:
        if parsed.scheme == "https":
            connection = ssl.create_default_context().wrap_socket(connection, server_hostname=parsed.hostname)
        connection.sendall((request + "\r\n").encode())
        status = connection.makefile("rb").readline(1024).decode("latin-1").strip()
    code = status.split(" ")[1] if status.startswith("HTTP/") and " " in status else ""
    if not code.startswith("2"):
        raise ConnectionError(f"the proxy answered {status!r}" if status else "the proxy closed the connection")


def _check_data_dir(name: str, data_dir: str | None, download: bool) -> None:
    """A ``data_dir`` that does not exist is a mistyped path far more often than a wish for a new one:
    say so, and create nothing.
    """
    if data_dir is None or pathlib.Path(data_dir).expanduser().is_dir():
        return
    hint = close_directory_hint(data_dir)
    remedy = (
        f"to download {name} into a new directory, create it first (mkdir -p {data_dir})"
        if download
        else f"point it at a TFDS data directory that holds {name}"
    )
    raise DatasetUnavailableError(f"config.data_dir={data_dir} does not exist{hint}; {remedy}.")


@dataclasses.dataclass(frozen=True)
class Split:
    """A decoded split, resident in host memory."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.labels)


# What tfds's downloader raises when the server cannot be reached at all.
_NO_NETWORK = (
    ConnectionError,
    TimeoutError,
    socket.gaierror,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
)


_CIFAR10_SUBSET = "../shared/tfds"


def _offline_advice(name: str, data_dir: str | None) -> str:
    """Where to point ``--config.data_dir`` instead: never the directory that was given."""
    if data_dir is None:
        advice = f"set --config.data_dir to a TFDS data directory that already holds {name}"
    else:
        advice = f"point --config.data_dir at another TFDS data directory, one that already holds {name}"
    if name == "cifar10" and (
        data_dir is None or pathlib.Path(data_dir).resolve() != pathlib.Path(_CIFAR10_SUBSET).resolve()
    ):
        advice += f" (the CIFAR-10 subset beside this repository: --config.data_dir={_CIFAR10_SUBSET})"
    return advice


def _download_failure(name: str, where: str, data_dir: str | None, error: Exception) -> DatasetUnavailableError:
    """The error for a failed download and preparation, naming its real cause."""
    offline = f"offline, {_offline_advice(name, data_dir)}"
    for cause in causes(error):
        if isinstance(cause, ModuleNotFoundError):
            return DatasetUnavailableError(
                f"downloading and preparing {name!r} into {where} needs the Python module {cause.name!r}, "
                "which is not installed: install the download extra (pip install -e '.[download]' in a clone, "
                f"or pip install 'nmfjax[download]'), or {offline}."
            )
        if isinstance(cause, _NO_NETWORK):
            return DatasetUnavailableError(
                f"{name!r} is not in {where} and downloading it failed: no network ({describe(cause)}). "
                f"Connect to the internet and rerun, or {offline}."
            )
        if isinstance(cause, tfds.download.DownloadError):
            return DatasetUnavailableError(
                f"{name!r} is not in {where} and the server refused the download ({describe(cause)}). "
                f"Rerun later, or {offline}."
            )
    return DatasetUnavailableError(
        f"{name!r} is not in {where} and preparing it there failed ({describe(error)}). "
        f"Rerun to try again (tfds keeps what it downloaded), or {offline}."
    )


@contextlib.contextmanager
def _absl_errors_only() -> Iterator[None]:
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def _not_array_record(name: str, where, error: Exception) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"{name!r} in {where} cannot be read as array_record ({describe(error)}); datasets prepared for tfds.load "
        "are often tfrecord, which has no random access. Prepare it into another data directory "
        "(--config.data_dir=NEW_DIR with --config.download=True), or point --config.data_dir at an array_record copy."
    )


def _open_source(name: str, split: str, data_dir: str | None, download: bool):
    """The split as a random-access ``tfds`` data source (array_record), downloading and preparing
    the dataset first when it is missing and ``download`` allows it.
    """
    _check_data_dir(name, data_dir, download)
    # array_record explicitly: tfds.data_source only picks it when no data_dir is given, and
    # a dataset prepared as tfrecord offers no random access.
    try:
        with _absl_errors_only():  # tfds warns "Variant folder ... has no dataset_info.json" for each missing dataset
            builder = tfds.builder(name, data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD)
            prepared = builder.is_prepared()
    except ValueError as error:  # e.g. "File format is already set to FileFormat.TFRECORD"
        raise _not_array_record(name, data_dir or "tfds's default data directory", error) from error
    where = builder.data_dir_root
    if not prepared:
        if not download:
            advice = _offline_advice(name, data_dir)
            raise DatasetUnavailableError(
                f"dataset {name!r} (split {split!r}) is not prepared in {where} and config.download is False. "
                f"{advice[0].upper()}{advice[1:]}, or allow the download with --config.download=True."
            )
        try:
            host = dataset_info(name).download_host
            if host is not None:
                check_host_reachable(host)
            # try_download_gcs=False: tfds's prepared copies on GCS are tfrecord, which cannot be used here.
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        except Exception as error:  # the causes are many (network, modules, archives); _download_failure names them
            raise _download_failure(name, where, data_dir, error) from error
    try:
        return builder.as_data_source(split=split)
    except Exception as error:  # tfds raises several types for data it cannot read
        raise _not_array_record(name, builder.data_dir, error) from error


DECODE_CHUNK = 1000


def _read_records(source, keys: range) -> list[dict]:
    try:
        return source.__getitems__(keys)
    except TypeError:  # tfds.testing.mock_data's sources have no working batched read
        return [source[key] for key in keys]


def _damaged(name: str, split: str, source, error: Exception) -> DatasetUnavailableError:
    """The error for a split whose files cannot be read back (overwritten bytes, a cut-off copy)."""
    info = getattr(source, "dataset_info", None)
    files = [str(path) for path in info.splits[split].filepaths] if info is not None else []
    version = pathlib.Path(files[0]).parent if files else None
    where = ", ".join(files) if files else f"the {name} data directory"
    remedy = (
        f"Move {version} aside (mv {version} {version}.damaged) and rerun with --config.download=True, which "
        f"downloads and prepares {name} again, or copy an intact {version.name} there"
        if version is not None
        else "Prepare the dataset again into a new data directory (--config.data_dir=NEW_DIR --config.download=True)"
    )
    return DatasetUnavailableError(f"the {split} split of {name!r} is damaged: {where} ({describe(error)}). {remedy}.")


def load_split(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    download: bool = True,
    limit: int | None = None,
    image_size: int | None = None,
) -> Split:
    """Reads a split (through ``tfds.data_source``, or an image folder's files) and decodes it once into arrays.

    Args:
      name: ``config.dataset``: a TFDS name, or :data:`IMAGE_FOLDER`.
      split: ``"train"`` or ``"test"`` (any TFDS split name for a TFDS dataset).
      data_dir: TFDS data directory (``None``: tfds's default); the image folder for :data:`IMAGE_FOLDER`.
      download: whether a missing TFDS dataset may be downloaded and prepared.
      limit: read only the first ``limit`` examples.
      image_size: resize every image to ``image_size x image_size`` (``config.image_size``); ``None``:
        as stored, which needs one size throughout.

    Returns:
      A :class:`Split` with uint8 images ``(N, H, W, C)`` and int32 labels.
    """
    info = dataset_info(name, data_dir)
    info.image_size(image_size)  # images of several sizes need image_size: say so before decoding
    if name == IMAGE_FOLDER:
        contents = image_folder.scan(data_dir)
        return Split(*image_folder.read_split(contents, split, image_size=image_size, limit=limit))
    source = _open_source(name, split, data_dir, download)
    count = len(source) if limit is None else min(limit, len(source))
    images: list[np.ndarray] = []
    labels: list[int] = []
    # _absl_errors_only: tfds's image decoder warns that OpenCV is not installed (it decodes with PIL alike).
    with _absl_errors_only(), tqdm(total=count, desc=f"decoding {name} {split}", unit="img", leave=False) as bar:
        # Reads in chunks: one read of many records is about twice as fast as one read per record.
        for first in range(0, count, DECODE_CHUNK):
            try:
                records = _read_records(source, range(first, min(first + DECODE_CHUNK, count)))
            except RuntimeError as error:  # array_record's reader: "Corrupted Riegeli/records file: ..."
                if "Riegeli" not in str(error):
                    raise
                raise _damaged(name, split, source, error) from None
            images += [_resized(np.asarray(record[info.image_key]), image_size) for record in records]
            labels += [record[info.label_key] for record in records]
            bar.update(len(records))
    return Split(np.stack(images).astype(np.uint8), np.asarray(labels, np.int32))


def _resized(image: np.ndarray, image_size: int | None) -> np.ndarray:
    """``(H, W, C)`` uint8 resized to ``image_size x image_size`` (bilinear, Pillow's); as it is where ``None``."""
    if image_size is None or image.shape[:2] == (image_size, image_size):
        return image
    channels = image.shape[-1]
    resized = PIL.Image.fromarray(image[..., 0] if channels == 1 else image).resize(
        (image_size, image_size), PIL.Image.Resampling.BILINEAR
    )
    return np.asarray(resized, np.uint8).reshape(image_size, image_size, channels)


# --- augmentation, on the device ---


def to_float(images: jax.Array | np.ndarray) -> jax.Array:
    """uint8 pixels to float32 in [0, 1]; float images pass unchanged."""
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    return images.astype(jnp.float32) / 255.0


def center_crop(images: jax.Array | np.ndarray, crop_size: int) -> jax.Array:
    """``(B, H, W, C)`` uint8 (or float in [0, 1]) -> ``(B, crop, crop, C)`` float32 in [0, 1]."""
    top = (images.shape[1] - crop_size) // 2
    left = (images.shape[2] - crop_size) // 2
    return to_float(images[:, top : top + crop_size, left : left + crop_size])


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
        for k, size in zip(jax.random.split(crop_key), (height, width), strict=True)
    )
    image = jax.lax.dynamic_slice(image, (top, left, 0), (crop_size, crop_size, channels))
    image = to_float(image)
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
    """The training augmentation of the paper (section 2.6) for a batch.

    Args:
      key: a ``jax.random.key``.
      images: ``(B, H, W, C)`` uint8.
      crop_size: side of the random crop.
      config: has ``flip`` (bool), ``brightness``, ``contrast``, ``saturation``, ``hue``.

    Returns:
      ``(B, crop, crop, C)`` float32 in [0, 1].
    """
    keys = jax.random.split(key, images.shape[0])

    def augment_one(image_key, image):
        return _augment_one(
            image_key, image, crop_size, config.flip, config.brightness, config.contrast, config.saturation, config.hue
        )

    return jax.vmap(augment_one)(keys, images)
