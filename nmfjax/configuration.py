"""The training config: the paper's recipe as defaults, its checks, and what a rerun may change.

:func:`default_config` is what ``configs/*.py`` start from. Its ``model`` part
holds the fields of :class:`nmfjax.models.NetworkSpec` (the network is built as
``NetworkSpec.from_config(config.model, input_shape)``); the rest is the recipe
of the paper (arXiv 2503.20398, section 2.6) and the authors' code.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from flax import nnx
from ml_collections import config_dict

from nmfjax import data, models, ops
from nmfjax.errors import ConfigError, MissingFileError, WorkdirError, describe
from nmfjax.validation import is_positive_int

PLATEAU_METRICS = ("train_loss", "test_loss")

#: The fields a rerun may change (how long and from where the run goes, not what its checkpoints mean).
#: Every other field (model, NMF options, learning rates, dataset, batch sizes, seed, ...)
#: must equal the workdir's config.json. A field covers its subfields (distributed.*).
RESUMABLE_FIELDS = (
    "num_epochs",
    "min_learning_rate",
    "data_dir",
    "download",
    "log_every_steps",
    "checkpoints_to_keep",
    "distributed",
    "cpu_devices",
)


def default_config() -> ml_collections.ConfigDict:
    """The paper's recipe for CNMF+1x1 on CIFAR-10; ``configs/*.py`` change what differs."""
    config = ml_collections.ConfigDict()

    # The network (paper section 2.5): the fields of nmfjax.models.NetworkSpec, NMF options under model.nmf.
    config.model = models.model_config()

    # Data (paper section 2.6): random crops, flips and colour jitter; pixels in [0, 1].
    config.dataset = "cifar10"  # "cifar10" | "mnist" | "fashion_mnist"
    config.data_dir = config_dict.placeholder(str)  # TFDS data directory; None: tfds's default
    config.download = True  # download and prepare a missing dataset (needs network and TensorFlow)
    config.crop_size = config_dict.placeholder(int)  # None: the dataset's default (28 CIFAR, 24 MNIST)
    config.num_train_examples = config_dict.placeholder(int)  # None: the whole train split
    config.augment = ml_collections.ConfigDict(dict(flip=True, brightness=0.5, contrast=0.1, saturation=0.1, hue=0.15))

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
    "dataset": f"the TFDS dataset: one of {tuple(data.DATASETS)}",
    "data_dir": "TFDS data directory that holds the dataset; None: tfds's default (~/tensorflow_datasets)",
    "download": "download and prepare a missing dataset into data_dir (needs network and the download extra)",
    "crop_size": "side of the random (train) and centre (test) crops; None: the dataset's default",
    "num_train_examples": "train on the first N training images only; None: all",
    "augment": "the training augmentation (paper section 2.6)",
    "augment.flip": "random horizontal flips",
    "augment.brightness": "colour jitter: brightness factor range 1 +- this",
    "augment.contrast": "colour jitter: contrast factor range 1 +- this",
    "augment.saturation": "colour jitter: saturation factor range 1 +- this",
    "augment.hue": "colour jitter: hue shift range +- this (of a full turn)",
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
    info = data.check_dataset(config.dataset)
    crop = config.crop_size or info.crop_size
    try:
        return models.NetworkSpec.from_config(config.model, (crop, crop, info.channels))
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


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
    "seed": ("an int", _is_int),
    "data_dir": ("a path or None (tfds's default)", lambda v: v is None or isinstance(v, str)),
    "download": ("True or False", lambda v: isinstance(v, bool)),
    "distributed.enabled": ("True or False", lambda v: isinstance(v, bool)),
    "distributed.coordinator_address": ("HOST:PORT or None", lambda v: v is None or isinstance(v, str)),
    "distributed.num_processes": ("a positive int or None", lambda v: v is None or is_positive_int(v)),
    "distributed.process_id": ("an int >= 0 or None", lambda v: v is None or (_is_int(v) and v >= 0)),
    "cpu_devices": ("a positive int or None (one per core)", lambda v: v is None or is_positive_int(v)),
    "model.pooling": ("a tuple of True/False", lambda v: all(isinstance(entry, bool) for entry in v)),
    "model.batch_norm": ("a tuple of True/False", lambda v: all(isinstance(entry, bool) for entry in v)),
    "augment.flip": ("True or False", lambda v: isinstance(v, bool)),
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
    spec = network_spec(config)
    for name, (expected, is_valid) in _FIELD_RULES.items():
        value = _field(config, name)
        if not is_valid(value):
            raise ConfigError(f"config.{name} must be {expected}, got {value!r}.")
    info = data.DATASETS[config.dataset]
    if spec.input_shape[0] > info.image_size:
        raise ConfigError(
            f"config.crop_size={spec.input_shape[0]} exceeds the {info.image_size}px images of {config.dataset}."
        )
    try:  # the shapes only: kernel sizes that do not fit the map, groups that do not divide
        nnx.eval_shape(lambda: models.Network(spec, rngs=nnx.Rngs(0)))
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if config.num_train_examples is not None and config.num_train_examples < config.batch_size:
        raise ConfigError(
            f"config.num_train_examples={config.num_train_examples} is smaller than config.batch_size="
            f"{config.batch_size}: an epoch would have no step. Train on at least {config.batch_size} examples, "
            "or lower config.batch_size."
        )
    devices = device_count or jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % devices:
            raise ConfigError(
                f"config.{name}={config[name]} must be divisible by the {devices} devices the batch is split over; "
                "set config.cpu_devices to a count that divides it (on a CPU), or change the batch size."
            )
    return spec


# --- saved configs ---

_MODEL_FIELDS_BEFORE_0_2 = (
    "kernel_sizes",
    "features",
    "pooling",
    "batch_norm",
    "groups",
    "mix_groups",
    "width",
    "batch_norm_statistics",
)


#: Fields added after 0.2, with the value that reproduces what a config.json written before them ran.
_ADDED_FIELDS = {
    "model.nmf.precision": "float32",  # 0.3 (the CPU ran every product in float32)
}


def upgrade_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A ``config.json`` in today's layout: workdirs written before the model fields moved
    under ``config.model`` (``model`` was the architecture's name, the NMF options
    ``config.nmf``) are converted, and fields added since are filled in with the value
    that reproduces the old run (``_ADDED_FIELDS``); others are returned as they are.
    """
    upgraded: dict[str, Any] = copy.deepcopy(dict(saved))
    if isinstance(upgraded.get("distributed"), bool):  # before config.distributed took its fields
        upgraded["distributed"] = {"enabled": upgraded["distributed"]}
    if isinstance(upgraded.get("model"), str):
        model = {"architecture": upgraded.pop("model")}
        model.update({name: upgraded.pop(name) for name in _MODEL_FIELDS_BEFORE_0_2 if name in upgraded})
        nmf = dict(upgraded.pop("nmf", {}))
        model["readout_learning"] = nmf.pop("readout_learning", None)
        model["nmf"] = nmf
        upgraded["model"] = model
    for name, value in _ADDED_FIELDS.items():
        *parents, leaf = name.split(".")
        section: Any = upgraded
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.setdefault(leaf, value)
    return upgraded


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def config_differences(saved: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """The fields, other than :data:`RESUMABLE_FIELDS`, in which ``config`` differs from a saved one.

    Args:
      saved: a workdir's ``config.json``, as loaded by ``json`` (older layouts
        are converted by :func:`upgrade_config`).
      config: the config of the new run.

    Returns:
      ``(field, saved value, new value)`` per differing field, by field name; a
      field missing on one side has the value ``"(absent)"`` there.
    """
    absent = "(absent)"
    old, new = _flatten(upgrade_config(saved)), _flatten(json.loads(config.to_json_best_effort()))
    return [
        (name, old.get(name, absent), new.get(name, absent))
        for name in sorted(old.keys() | new.keys())
        if name.split(".")[0] not in RESUMABLE_FIELDS and old.get(name, absent) != new.get(name, absent)
    ]


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its ``config.json``, converted to today's layout)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise MissingFileError(f"{path} does not exist: is {workdir} a workdir written by train.py?")
    try:
        return ml_collections.ConfigDict(upgrade_config(json.loads(path.read_text())))
    except ValueError as error:
        raise WorkdirError(f"{path} cannot be read ({describe(error)}).") from None


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
