"""A folder of one's own images as a dataset (``--config.dataset=image_folder --config.data_dir=DIR``).

``DIR`` holds ``train/LABEL/IMAGE`` and ``test/LABEL/IMAGE``, the layout of
TFDS's ``ImageFolder``: one folder per class, its name the class name. The
images are decoded with Pillow into the same resident uint8 arrays as a TFDS
dataset's: one channel where every image is grey, three otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from nmfjax.errors import DatasetUnavailableError, describe

SPLITS = ("train", "test")
LAYOUT = "DIR/train/LABEL/IMAGE and DIR/test/LABEL/IMAGE (TFDS's ImageFolder layout)"

# Pillow's modes of grey images; every other mode is read as RGB.
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


@dataclasses.dataclass(frozen=True)
class FolderContents:
    """What a scan of an image folder found."""

    root: pathlib.Path
    class_names: tuple[str, ...]  # the class folders of train/, sorted; a label is an index into them
    files: dict[str, tuple[tuple[pathlib.Path, int], ...]]  # split -> (image file, label), in a fixed mixed order
    sizes: frozenset[tuple[int, int]]  # the (height, width) of the images
    channels: int  # 1 where every image is grey, else 3

    @property
    def image_shape(self) -> tuple[int | None, int | None, int]:
        """``(height, width, channels)``; ``None`` sizes where they vary."""
        (height, width), *others = sorted(self.sizes)
        if others:
            return None, None, self.channels
        return height, width, self.channels


def _visible(directory: pathlib.Path) -> list[pathlib.Path]:
    # Hidden entries (.DS_Store, ._x from macOS copies, .ipynb_checkpoints) are not data.
    return sorted(child for child in directory.iterdir() if not child.name.startswith("."))


def _signature(root: pathlib.Path) -> tuple:
    """The modification times of the folder and its split and class folders: they change when a file
    is added, removed or renamed, so a cached scan is repeated then.
    """
    directories = [root] + [d for split in SPLITS if (root / split).is_dir() for d in [root / split]]
    directories += [child for d in directories[1:] for child in d.iterdir() if child.is_dir()]
    return tuple((str(d), d.stat().st_mtime_ns) for d in directories)


def scan(data_dir: str | pathlib.Path | None) -> FolderContents:
    """The classes, files, sizes and channels of an image folder, every file opened once (its header).

    Raises:
      DatasetUnavailableError: the folder, ``train/`` or ``test/`` is missing, a class folder is empty,
        a test class has no train folder, or a file is not an image; naming it and the fix.
    """
    if data_dir is None:
        raise DatasetUnavailableError(
            f"config.dataset=image_folder needs --config.data_dir=DIR, a folder that holds {LAYOUT}."
        )
    root = pathlib.Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DatasetUnavailableError(f"config.data_dir={data_dir} does not exist; it must be a folder with {LAYOUT}.")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DatasetUnavailableError(
                f"{root} has no {split}/ folder: an image folder holds {LAYOUT}. Create {root / split} "
                "with one folder of images per class."
            )
    return _scan(root, _signature(root))


@functools.lru_cache(maxsize=8)
def _scan(root: pathlib.Path, signature: tuple) -> FolderContents:
    del signature  # only the cache's key
    class_names = tuple(child.name for child in _visible(root / "train") if child.is_dir())
    if not class_names:
        raise DatasetUnavailableError(
            f"{root / 'train'} holds no class folders: put each class's images in train/LABEL/ (and test/LABEL/)."
        )
    labels = {name: label for label, name in enumerate(class_names)}
    files, sizes, modes = {}, set(), set()
    for split in SPLITS:
        found = []
        for entry in _visible(root / split):
            if not entry.is_dir():
                raise DatasetUnavailableError(
                    f"{entry} is not in a class folder: images go in {split}/LABEL/, one folder per class."
                )
            if entry.name not in labels:
                raise DatasetUnavailableError(
                    f"{entry} is a class that train/ does not have ({', '.join(class_names)}): "
                    f"add {root / 'train' / entry.name} with its training images, or rename the folder."
                )
            images = [path for path in _visible(entry) if path.is_file()]
            if not images:
                raise DatasetUnavailableError(
                    f"the class folder {entry} is empty: put its images there, or remove the folder."
                )
            for path in images:
                try:
                    with Image.open(path) as image:
                        sizes.add((image.height, image.width))
                        modes.add(image.mode)
                except (UnidentifiedImageError, OSError) as error:
                    raise DatasetUnavailableError(
                        f"{path} is not an image Pillow can read ({describe(error)}): remove it or move it out "
                        f"of {root}."
                    ) from None
                found.append((path, labels[entry.name]))
        # A fixed mixed order, so that the first N images (config.num_train_examples) hold every class.
        order = np.random.default_rng(0).permutation(len(found))
        files[split] = tuple(found[index] for index in order)
    channels = 1 if modes <= _GREY_MODES else 3
    return FolderContents(root, class_names, files, frozenset(sizes), channels)


def read_split(
    contents: FolderContents, split: str, *, image_size: int | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a split: uint8 images ``(N, H, W, C)`` and int32 labels ``(N,)``.

    Args:
      contents: a :func:`scan` of the folder.
      split: ``"train"`` or ``"test"``.
      image_size: resize every image to ``image_size x image_size`` (bilinear); ``None``: as stored,
        which needs one size throughout.
      limit: read only the first ``limit`` images (of a fixed order that mixes the classes).
    """
    files = contents.files[split][:limit]
    mode = "L" if contents.channels == 1 else "RGB"
    images = []
    for path, _ in tqdm(files, desc=f"decoding {contents.root.name} {split}", unit="img", leave=False):
        with Image.open(path) as image:
            image = image.convert(mode)
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            images.append(np.asarray(image, np.uint8).reshape(image.height, image.width, contents.channels))
    labels = np.asarray([label for _, label in files], np.int32)
    return np.stack(images), labels
