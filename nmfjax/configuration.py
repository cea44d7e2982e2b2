"""The training config: the paper's recipe as defaults, its checks, and what a rerun may change.

:func:`default_config` is what ``configs/*.py`` start from. Its ``model`` part
holds the fields of :class:`nmfjax.models.NetworkSpec` (the network is built as
by :func:`network_spec`); the rest is the recipe
of the paper (arXiv 2503.20398, section 2.6) and the authors' code.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import pathlib
import re
import types
import typing
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict

from nmfjax import cpu_kernel, data, models, ops
from nmfjax.errors import ConfigError, MissingFileError
from nmfjax.validation import is_positive_int

PLATEAU_METRICS = ("train_loss", "test_loss")

#: The last entry of ``config.model.features`` that stands for the data's number of classes.
CLASSES = 0

#: The fields a rerun may change (how long and from where the run goes, not what its checkpoints mean).
#: Every other field (model, NMF options, learning rates, dataset, batch sizes, seed, ...)
#: must equal the workdir's config.json. A field covers its subfields (distributed.*).
#: Where the NMF op runs (model.nmf.kernel), whether XLA's loop is unrolled (model.nmf.unroll)
#: and how many steps go in one call change the numbers by float32 round-off at most.
RESUMABLE_FIELDS = (
    "num_epochs",
    "min_learning_rate",
    "data_dir",
    "download",
    "log_every_steps",
    "checkpoints_to_keep",
    "distributed",
    "cpu_devices",
    "steps_per_call",
    "model.nmf.kernel",
    "model.nmf.unroll",
)


# --- the model's fields, from the dataclasses of nmfjax.models and nmfjax.ops ---


def _placeholder_type(annotation: Any) -> type | None:
    """``X | None`` -> ``X``, for the typed placeholders of ConfigDict."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (kind,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return kind
    return None


def _as_config(instance: Any) -> ml_collections.ConfigDict:
    """A frozen dataclass's fields as a ConfigDict: nested dataclasses nest, ``X | None`` fields
    become typed placeholders (so ``--config.model.readout_learning=local_kl`` parses).
    """
    hints = typing.get_type_hints(type(instance))
    config = ml_collections.ConfigDict()
    for field in dataclasses.fields(instance):
        if not field.metadata.get("config", True):
            continue  # (a field for direct callers only, e.g. NMFOptions.check_inputs)
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            config[field.name] = _as_config(value)
        elif value is None:
            config[field.name] = config_dict.placeholder(_placeholder_type(hints[field.name]))
        else:
            config[field.name] = value
    return config


def model_config(**changes: Any) -> ml_collections.ConfigDict:
    """``config.model``: the fields of :class:`~nmfjax.models.NetworkSpec` but ``input_shape``, with their defaults
    (the paper's CNMF+1x1), ``nmf`` nested; ``changes`` replace defaults, e.g. ``architecture="cnn"``.
    """
    config = _as_config(models.NetworkSpec(**changes))
    del config["input_shape"]  # from the dataset and the crop
    return config


def default_config() -> ml_collections.ConfigDict:
    """The paper's recipe for CNMF+1x1 on CIFAR-10; ``configs/*.py`` change what differs."""
    config = ml_collections.ConfigDict()

    # The network (paper section 2.5): the fields of nmfjax.models.NetworkSpec, NMF options under model.nmf.
    config.model = model_config()
    config.model.features = (32, 64, 96, CLASSES)  # the last block has one output per class of the data
    # The NMF iterations by the fastest path of the platform: the fused C++ kernel on a CPU with AVX-512,
    # Triton on a GPU (where its programs fill the SMs), else XLA's loop.
    config.model.nmf.kernel = "auto"

    # Data (paper section 2.6): random crops, flips and colour jitter; pixels in [0, 1].
    config.dataset = "cifar10"  # any TFDS image classification dataset, or "image_folder" (data_dir: the folder)
    config.data_dir = config_dict.placeholder(str)  # TFDS data directory; None: tfds's default
    config.download = True  # download and prepare a missing dataset (needs network and TensorFlow)
    config.image_size = config_dict.placeholder(int)  # None: as stored; N: every image resized to N x N
    config.crop_size = config_dict.placeholder(int)  # None: 7/8 of the image (28 of 32 as the paper, 24 of 28)
    config.num_train_examples = config_dict.placeholder(int)  # None: the whole train split
    config.augment = ml_collections.ConfigDict(
        # flip None: the data's default (off for digits and letters); saturation and hue need colour.
        dict(flip=config_dict.placeholder(bool), brightness=0.5, contrast=0.1, saturation=0.1, hue=0.15)
    )

    # Optimisation: Adam with one learning rate per parameter group (nmfjax.models.PARAMETER_GROUPS),
    # divided by 10 after 10 epochs without improvement, until every rate is below 1e-9 or 500 epochs.
    config.batch_size = 50
    config.eval_batch_size = 50  # with "batch" statistics the eval batch size changes the results
    config.num_epochs = 500
    config.learning_rates = ml_collections.ConfigDict(dict(module_a=0.01, mixing=0.001, batch_norm=0.001))
    config.plateau = ml_collections.ConfigDict(dict(metric="train_loss", factor=0.1, patience=10, rtol=1e-4))
    config.min_learning_rate = 1e-9  # stop when every learning rate is below this
    config.seed = 0

    # Bookkeeping.
    config.checkpoints_to_keep = 3  # the latest ones; the best by test accuracy is kept as well
    config.log_every_steps = 20
    # Training steps per compiled call (a scan over K batches); None: 1 on a CPU, 10 on an accelerator.
    config.steps_per_call = config_dict.placeholder(int)
    # Several processes (hosts) in one run; README "Several hosts". With enabled=True, the three
    # fields below, else JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, else JAX's
    # own cluster detection (SLURM, ...).
    config.distributed = ml_collections.ConfigDict(
        dict(
            enabled=False,
            coordinator_address=config_dict.placeholder(str),  # HOST:PORT of process 0
            num_processes=config_dict.placeholder(int),
            process_id=config_dict.placeholder(int),  # 0 .. num_processes - 1; process 0 writes the workdir
        )
    )
    # XLA devices on a CPU; None: one per core (the largest count up to that which divides the batch sizes).
    # XLA_FLAGS=--xla_force_host_platform_device_count=N or JAX_NUM_CPU_DEVICES=N win over it.
    config.cpu_devices = config_dict.placeholder(int)
    return config


#: One line of meaning per field outside ``model`` (those come from the docstrings of
#: :class:`~nmfjax.models.NetworkSpec` and :class:`~nmfjax.ops.NMFOptions`); ``--show_config`` prints them.
FIELD_HELP = {
    "model": "the network (paper section 2.5): fields of nmfjax.models.NetworkSpec",
    "model.nmf": "options of the NMF op in module a: fields of nmfjax.ops.NMFOptions",
    "dataset": f"any TFDS image classification dataset by name (cifar10, cifar100, mnist, ...), or "
    f"{data.IMAGE_FOLDER!r}: data_dir holding train/LABEL/IMAGE and test/LABEL/IMAGE",
    "data_dir": "TFDS data directory that holds the dataset; None: tfds's default (~/tensorflow_datasets)",
    "download": "download and prepare a missing dataset into data_dir (needs network and the download extra)",
    "image_size": "resize every image to N x N (needed where the images differ in size); None: as stored",
    "crop_size": "side of the random (train) and centre (test) crops; None: 7/8 of the image side (28 of 32)",
    "num_train_examples": "train on the first N training images only; None: all",
    "augment": "the training augmentation (paper section 2.6)",
    "augment.flip": "random horizontal flips; None: the data's default, off for digits and letters "
    f"({', '.join(data.NO_FLIP_DATASETS)}), on for the rest and image folders",
    "augment.brightness": "colour jitter: brightness factor range 1 +- this",
    "augment.contrast": "colour jitter: contrast factor range 1 +- this",
    "augment.saturation": "colour jitter: saturation factor range 1 +- this (colour images only)",
    "augment.hue": "colour jitter: hue shift range +- this, of a full turn (colour images only)",
    "batch_size": "training batch size (must divide by the device count)",
    "eval_batch_size": "test batch size; with batch statistics in BatchNorm it changes the results",
    "num_epochs": "epochs to train (a rerun with more continues)",
    "learning_rates": "Adam's learning rate per parameter group (nmfjax.models.PARAMETER_GROUPS)",
    "learning_rates.module_a": "the NMF weights or first convolutions of each block",
    "learning_rates.mixing": "the 1x1 mixing convolutions",
    "learning_rates.batch_norm": "BatchNorm's scales and offsets",
    "plateau": "reduce-on-plateau rule applied after each epoch",
    "plateau.metric": f"what it watches: one of {PLATEAU_METRICS}",
    "plateau.factor": "multiplies every learning rate when the metric stops improving",
    "plateau.patience": "epochs without improvement before it does",
    "plateau.rtol": "relative improvement that counts as one",
    "min_learning_rate": "training stops when every learning rate is below this",
    "seed": "initialisation, data order and augmentation",
    "checkpoints_to_keep": "the latest checkpoints kept (the best by test accuracy is kept as well)",
    "log_every_steps": "how often the progress bar shows the running loss",
    "steps_per_call": "training steps in one compiled call; None: 1 on a CPU, 10 on an accelerator (same results)",
    "distributed": "one run over several processes (README, 'Several hosts')",
    "distributed.enabled": "start jax.distributed; the fields below or JAX_* variables or the cluster name the run",
    "distributed.coordinator_address": "HOST:PORT of process 0",
    "distributed.num_processes": "how many processes the run has",
    "distributed.process_id": "this process's index (0 writes the workdir)",
    "cpu_devices": "XLA devices on a CPU; None: one per core (the largest count that divides the batch sizes)",
}


def _attribute_help(cls: type) -> dict[str, str]:
    """The first sentence of each entry of a class docstring's ``Attributes:`` section."""
    doc = (cls.__doc__ or "").split("Attributes:", 1)[-1]
    entries: dict[str, str] = {}
    name = None
    for line in doc.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if len(line) - len(line.lstrip()) <= 6 and ":" in stripped and stripped.split(":")[0].isidentifier():
            name, text = stripped.split(":", 1)
            entries[name] = text.strip()
        elif name is not None:
            entries[name] += " " + stripped
    plain = {key: re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "") for key, text in entries.items()}
    return {key: re.split(r"\.\s+(?=[A-Z])", text)[0].rstrip(".") for key, text in plain.items()}


def field_help() -> dict[str, str]:
    """One line of meaning for every field of :func:`default_config`, by dotted name."""
    described = dict(FIELD_HELP)
    fields = default_config()
    model = _attribute_help(models.NetworkSpec)
    nmf = _attribute_help(ops.NMFOptions)
    described.update({f"model.{key}": model[key] for key in fields.model.keys() if key != "nmf"})
    described.update({f"model.nmf.{key}": nmf[key] for key in fields.model.nmf.keys()})
    return described


def describe_config(config: ml_collections.ConfigDict) -> str:
    """Every field of ``config`` with its value and one line of meaning, grouped as the config is
    (what ``train.py --show_config`` prints).
    """
    described = field_help()
    lines = ["Every field can be set with --config.FIELD=VALUE (e.g. --config.model.nmf.iterations=10)."]

    def walk(section: ml_collections.ConfigDict, prefix: str, depth: int) -> None:
        for key in section.keys():
            name, value, indent = f"{prefix}{key}", section[key], "  " * depth
            meaning = described.get(name, "")
            if isinstance(value, ml_collections.ConfigDict):
                lines.append(f"{indent}{key}:  {meaning}".rstrip())
                walk(value, f"{name}.", depth + 1)
            else:
                shown = tuple(value) if isinstance(value, list) else value
                lines.append(f"{indent}{key} = {shown!r}".ljust(40) + f"  {meaning}".rstrip())

    walk(config, "", 0)
    return "\n".join(lines)


def network_spec(config: ml_collections.ConfigDict) -> models.NetworkSpec:
    """The network of a config as a validated :class:`~nmfjax.models.NetworkSpec`.

    Raises:
      ConfigError: naming the field that is wrong.
    """
    info = data.dataset_info(config.dataset, config.data_dir)
    crop = config.crop_size or info.crop_size(config.image_size)
    fields = config.model.to_dict()
    fields["features"] = _features_for(tuple(fields["features"]), info)
    try:
        nmf = ops.NMFOptions(**fields.pop("nmf"))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"config.model.nmf: {error}") from None
    fields = {name: tuple(value) if isinstance(value, list) else value for name, value in fields.items()}
    try:
        return models.NetworkSpec(input_shape=(crop, crop, info.channels), nmf=nmf, **fields)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def _features_for(features: tuple[int, ...], info: data.DatasetInfo) -> tuple[int, ...]:
    """``config.model.features`` with its last entry the data's classes (where it is :data:`CLASSES`);
    a last entry that is another number than the classes is a ConfigError.
    """
    if not features or features[-1] == CLASSES:
        return features[:-1] + (info.num_classes,)
    if features[-1] != info.num_classes:
        raise ConfigError(
            f"config.model.features ends in {features[-1]}, but {info.name} has {info.num_classes} classes: the last "
            f"block has one output per class. End it in {info.num_classes}, or in {CLASSES} (the data's classes)."
        )
    return features


def with_data_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the defaults that depend on the data filled in: the last block's
    outputs (:data:`CLASSES`: the number of classes) and ``augment.flip`` (None: the data's default).
    This is the config a run saves in its ``config.json``.
    """
    info = data.dataset_info(config.dataset, config.data_dir)
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.features = _features_for(tuple(config.model.features), info)
        if config.augment.flip is None:
            config.augment.flip = info.flip
    return config


def describe_data_defaults(config: ml_collections.ConfigDict) -> str:
    """What the defaults that follow the data come to for ``config.dataset`` (``--show_config``'s last lines)."""
    info = data.dataset_info(config.dataset, config.data_dir)
    resolved = with_data_defaults(config)
    height, width = info.image_size(config.image_size)
    crop = config.crop_size or info.crop_size(config.image_size)
    colour = "brightness, contrast, saturation and hue" if info.channels == 3 else "brightness and contrast"
    return (
        f"For {config.dataset} ({height}x{width}x{info.channels} images, {info.num_classes} classes): "
        f"model.features = {tuple(resolved.model.features)!r}, crop_size {crop}, "
        f"augment.flip = {resolved.augment.flip!r}, colour jitter of {colour}."
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Field -> (what it must be, test). The model's fields are checked by models.NetworkSpec.
_FIELD_RULES = {
    "batch_size": ("a positive int", is_positive_int),
    "eval_batch_size": ("a positive int", is_positive_int),
    "num_epochs": ("a positive int", is_positive_int),
    "log_every_steps": ("a positive int", is_positive_int),
    "checkpoints_to_keep": ("a positive int", is_positive_int),
    "num_train_examples": ("a positive int or None (all)", lambda v: v is None or is_positive_int(v)),
    "crop_size": ("a positive int or None (the dataset's default)", lambda v: v is None or is_positive_int(v)),
    "image_size": ("a positive int or None (as stored)", lambda v: v is None or is_positive_int(v)),
    "seed": ("an int", _is_int),
    "data_dir": ("a path or None (tfds's default)", lambda v: v is None or isinstance(v, str)),
    "download": ("True or False", lambda v: isinstance(v, bool)),
    "distributed.enabled": ("True or False", lambda v: isinstance(v, bool)),
    "distributed.coordinator_address": ("HOST:PORT or None", lambda v: v is None or isinstance(v, str)),
    "distributed.num_processes": ("a positive int or None", lambda v: v is None or is_positive_int(v)),
    "distributed.process_id": ("an int >= 0 or None", lambda v: v is None or (_is_int(v) and v >= 0)),
    "cpu_devices": ("a positive int or None (one per core)", lambda v: v is None or is_positive_int(v)),
    "steps_per_call": ("a positive int or None (per platform)", lambda v: v is None or is_positive_int(v)),
    "model.pooling": ("a tuple of True/False", lambda v: all(isinstance(entry, bool) for entry in v)),
    "model.batch_norm": ("a tuple of True/False", lambda v: all(isinstance(entry, bool) for entry in v)),
    "augment.flip": ("True, False or None (the data's default)", lambda v: v is None or isinstance(v, bool)),
    "augment.brightness": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "augment.contrast": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "augment.saturation": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "augment.hue": ("a number in [0, 0.5]", lambda v: _is_number(v) and 0 <= v <= 0.5),
    **{
        f"learning_rates.{group}": ("a positive number", lambda v: _is_number(v) and v > 0)
        for group in models.PARAMETER_GROUPS
    },
    "min_learning_rate": ("a positive number", lambda v: _is_number(v) and v > 0),
    "plateau.metric": (f"one of {PLATEAU_METRICS}", lambda v: v in PLATEAU_METRICS),
    "plateau.factor": ("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1),
    "plateau.patience": ("a positive int", is_positive_int),
    "plateau.rtol": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
}


def _field(config: ml_collections.ConfigDict, name: str):
    value = config
    for part in name.split("."):
        if part not in value:
            raise ConfigError(f"the config has no field {name!r}: start from nmfjax.configuration.default_config().")
        value = value[part]
    return value


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> models.NetworkSpec:
    """Checks the type and range of every field, and that the network can be built,
    before any work starts.

    Args:
      config: the config.
      device_count: the devices the batches are split over (default: every device).

    Returns:
      The network spec of the config.

    Raises:
      ConfigError: naming the field, its value and what it must be.
    """
    for name, (expected, is_valid) in _FIELD_RULES.items():
        value = _field(config, name)
        if not is_valid(value):
            raise ConfigError(f"config.{name} must be {expected}, got {value!r}.")
    spec = network_spec(config)
    info = data.dataset_info(config.dataset, config.data_dir)
    height, width = info.image_size(config.image_size)
    if spec.input_shape[0] > min(height, width):
        raise ConfigError(
            f"config.crop_size={spec.input_shape[0]} exceeds the {height}x{width}px images of {config.dataset}."
        )
    try:  # the shapes only: kernel sizes that do not fit the map, groups that do not divide
        models.check_buildable(spec)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if config.num_train_examples is not None and config.num_train_examples < config.batch_size:
        raise ConfigError(
            f"config.num_train_examples={config.num_train_examples} is smaller than config.batch_size="
            f"{config.batch_size}: an epoch would have no step. Train on at least {config.batch_size} examples, "
            "or lower config.batch_size."
        )
    if spec.uses_nmf and spec.nmf.kernel == "cpu" and jax.default_backend() == "cpu":
        reason = cpu_kernel.unavailable_reason()
        if reason is not None:
            raise ConfigError(
                f"config.model.nmf.kernel='cpu' cannot run here: {reason}. "
                "Use kernel 'auto' (XLA's loop where the kernel cannot be built) or 'xla'."
            )
    devices = device_count or jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % devices:
            raise ConfigError(
                f"config.{name}={config[name]} must be divisible by the {devices} devices the batch is split over; "
                "set config.cpu_devices to a count that divides it (on a CPU), or change the batch size."
            )
    return spec


def config_from_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file such as ``configs/cnmf_1x1.py``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} does not exist (e.g. configs/cnmf_1x1.py).")
    module_spec = importlib.util.spec_from_file_location(f"nmfjax_config_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None  # a .py file that exists
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted fields replaced, e.g. ``{"model.nmf.iterations": 5, "model.width": 2}``."""
    config = copy.deepcopy(config)
    for name, value in overrides.items():
        *parents, leaf = name.split(".")
        target = config
        for parent in parents:
            target = target[parent] if parent in target else None
            if not isinstance(target, ml_collections.ConfigDict):
                break
        if not isinstance(target, ml_collections.ConfigDict) or leaf not in target:
            raise ConfigError(f"the config has no field {name!r}.")
        target[leaf] = value
    return config
