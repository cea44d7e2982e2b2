"""Training and evaluation of the paper's networks (SPEC section 4).

``train_and_evaluate(config, workdir)`` runs the whole recipe: the composite
CE + MSE loss on the softmax output, Adam with one learning rate per parameter
group, the reduce-on-plateau rule after each epoch, orbax checkpoints every
epoch (resumed automatically), ``metrics.jsonl`` and TensorBoard events in the
workdir. The train step runs data-parallel over every visible device: a 1-D
mesh over the batch, parameters replicated.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import optax.contrib
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from nmfjax import data, models
from nmfjax.errors import (
    ConfigError,
    MissingFileError,
    TrainingDiverged,
    TrainingInterrupted,
    WorkdirError,
    describe,
)

PLATEAU_METRICS = ("train_loss", "test_loss")
LEARNING_RATE_GROUPS = ("module_a", "mixing", "batch_norm")
_CE_WEIGHT, _MSE_WEIGHT = 1.0, 0.5


# --- configuration ---


def network_spec(config: ml_collections.ConfigDict) -> models.NetworkSpec:
    """The model part of a config as a validated :class:`~nmfjax.models.NetworkSpec`.

    Raises:
      ConfigError: naming the field that is wrong.
    """
    info = data.check_dataset(config.dataset)
    crop = config.crop_size or info.crop_size
    try:
        return models.NetworkSpec(
            architecture=config.model,
            input_shape=(crop, crop, info.channels),
            kernel_sizes=tuple(config.kernel_sizes),
            features=tuple(config.features),
            pooling=tuple(config.pooling),
            batch_norm=tuple(config.batch_norm),
            groups=tuple(config.groups),
            mix_groups=tuple(config.mix_groups),
            width=config.width,
            batch_norm_statistics=config.batch_norm_statistics,
            iterations=config.nmf.iterations,
            epsilon=config.nmf.epsilon,
            gradient=config.nmf.gradient,
            learning=config.nmf.learning,
            readout_learning=config.nmf.get("readout_learning"),  # absent from configs saved before it existed
            adjoint_iterations=config.nmf.adjoint_iterations,
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Field -> (what it must be, test). The model fields are checked by models.NetworkSpec.
_FIELD_RULES = {
    "batch_size": ("a positive int", lambda v: _is_int(v) and v > 0),
    "eval_batch_size": ("a positive int", lambda v: _is_int(v) and v > 0),
    "num_epochs": ("a positive int", lambda v: _is_int(v) and v > 0),
    "log_every_steps": ("a positive int", lambda v: _is_int(v) and v > 0),
    "checkpoints_to_keep": ("a positive int", lambda v: _is_int(v) and v > 0),
    "num_train_examples": ("a positive int or None (all)", lambda v: v is None or (_is_int(v) and v > 0)),
    "crop_size": ("a positive int or None (the dataset's default)", lambda v: v is None or (_is_int(v) and v > 0)),
    "seed": ("an int", _is_int),
    "data_dir": ("a path or None (tfds's default)", lambda v: v is None or isinstance(v, str)),
    "download": ("True or False", lambda v: isinstance(v, bool)),
    "distributed": ("True or False", lambda v: isinstance(v, bool)),
    "pooling": ("a tuple of True/False", lambda v: all(isinstance(entry, bool) for entry in v)),
    "batch_norm": ("a tuple of True/False", lambda v: all(isinstance(entry, bool) for entry in v)),
    "augment.flip": ("True or False", lambda v: isinstance(v, bool)),
    "augment.brightness": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "augment.contrast": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "augment.saturation": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "augment.hue": ("a number in [0, 0.5]", lambda v: _is_number(v) and 0 <= v <= 0.5),
    **{
        f"learning_rates.{group}": ("a positive number", lambda v: _is_number(v) and v > 0)
        for group in LEARNING_RATE_GROUPS
    },
    "min_learning_rate": ("a positive number", lambda v: _is_number(v) and v > 0),
    "plateau.metric": (f"one of {PLATEAU_METRICS}", lambda v: v in PLATEAU_METRICS),
    "plateau.factor": ("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1),
    "plateau.patience": ("a positive int", lambda v: _is_int(v) and v > 0),
    "plateau.rtol": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
}


def _field(config: ml_collections.ConfigDict, name: str):
    value = config
    for part in name.split("."):
        if part not in value:
            raise ConfigError(f"the config has no field {name!r}: start from configs/default.py.")
        value = value[part]
    return value


def validate_config(config: ml_collections.ConfigDict) -> models.NetworkSpec:
    """Checks the type and range of every field, and that the network can be built,
    before any work starts.

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
    devices = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % devices:
            raise ConfigError(
                f"config.{name}={config[name]} must be divisible by the {devices} devices the batch is split over."
            )
    return spec


# --- loss, optimiser, state ---


def composite_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """SPEC's loss per example: ``(1.0 * CE(y, p) + 0.5 * sum_c (p_c - y_c)^2) / 1.5``.

    Args:
      logits: ``(B, classes)``; ``p = softmax(logits)`` is the network's output.
      labels: ``(B,)`` integer classes.

    Returns:
      ``(B,)`` losses.
    """
    log_probabilities = jax.nn.log_softmax(logits)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    cross_entropy = -jnp.sum(targets * log_probabilities, axis=-1)
    squared_error = jnp.sum((jnp.exp(log_probabilities) - targets) ** 2, axis=-1)
    return (_CE_WEIGHT * cross_entropy + _MSE_WEIGHT * squared_error) / (_CE_WEIGHT + _MSE_WEIGHT)


def summed_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """A batch's summed loss, correct predictions and example count (add batches, then divide)."""
    return {
        "loss": jnp.sum(composite_loss(logits, labels)),
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
        "count": labels.shape[0],
    }


def make_optimizer(config: ml_collections.ConfigDict, params: nnx.State) -> optax.GradientTransformation:
    """Adam (PyTorch defaults) with one learning rate per group (SPEC section 4):
    module-a weights, 1x1 convolutions and BatchNorm; see :func:`models.parameter_group`."""
    labels = jax.tree_util.tree_map_with_path(lambda path, _: models.parameter_group(path), params)
    transforms = {group: optax.adam(config.learning_rates[group]) for group in LEARNING_RATE_GROUPS}
    return optax.multi_transform(transforms, labels)


def make_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    # PyTorch's ReduceLROnPlateau reduces after more than `patience` bad epochs,
    # optax's after exactly `patience`: shift by one to match the authors' code.
    return optax.contrib.reduce_on_plateau(
        factor=config.plateau.factor, patience=config.plateau.patience + 1, rtol=config.plateau.rtol, atol=0.0
    )


@flax.struct.dataclass
class TrainState:
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    plateau: optax.contrib.ReduceLROnPlateauState


def learning_rates(config: ml_collections.ConfigDict, state: TrainState) -> dict[str, float]:
    scale = float(state.plateau.scale)
    return {group: config.learning_rates[group] * scale for group in LEARNING_RATE_GROUPS}


# --- the trainer ---


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """The 1-D mesh the batch is split over: every visible device (or ``devices``)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


class Trainer:
    """The jitted train and eval steps of one config, sharded over a mesh of all devices."""

    def __init__(self, config: ml_collections.ConfigDict, spec: models.NetworkSpec, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharded = NamedSharding(mesh, P("data"))
        model = models.Network(spec, rngs=nnx.Rngs(config.seed))
        self.graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        model.eval()
        self.eval_graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
        self.tx = make_optimizer(config, params)
        self.plateau_tx = make_plateau(config)
        self.crop_size = spec.input_shape[0]
        state = TrainState(
            params=params,
            batch_stats=batch_stats,
            opt_state=self.tx.init(params),
            plateau=self.plateau_tx.init(jnp.zeros((), jnp.float32)),
        )
        self.initial_state = jax.device_put(state, self.replicated)
        self.train_step = jax.jit(self._train_step_impl, donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step_impl)
        self._plateau_step = jax.jit(self._plateau_step_impl)

    def put_replicated(self, array: np.ndarray) -> jax.Array:
        """A host array replicated on every device (multi-host too)."""
        return jax.make_array_from_callback(array.shape, self.replicated, lambda index: array[index])

    def _train_step_impl(self, state: TrainState, images, labels, batch_indices, key):
        batch_indices = jax.lax.with_sharding_constraint(batch_indices, self.batch_sharded)
        inputs = data.augment(key, images[batch_indices], self.crop_size, self.config.augment)
        targets = labels[batch_indices]

        def loss_fn(params):
            # Fresh BatchStat variables of this trace, which BatchNorm may update.
            batch_stats = jax.tree.map(jnp.asarray, state.batch_stats)
            model = nnx.merge(self.graphdef, params, batch_stats)
            logits = model.logits(inputs)
            return jnp.mean(composite_loss(logits, targets)), (logits, nnx.state(model, nnx.BatchStat))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        # Adam's step is linear in the learning rate, so scaling it scales every group's rate.
        updates = jax.tree.map(lambda update: update * state.plateau.scale, updates)
        state = state.replace(
            params=optax.apply_updates(state.params, updates), batch_stats=batch_stats, opt_state=opt_state
        )
        metrics = {
            "loss": loss * targets.shape[0],
            "correct": jnp.sum(jnp.argmax(logits, -1) == targets),
            "count": targets.shape[0],
        }
        return state, metrics

    def _eval_step_impl(self, state: TrainState, images, labels, batch_indices):
        if batch_indices.shape[0] % self.mesh.size == 0:
            batch_indices = jax.lax.with_sharding_constraint(batch_indices, self.batch_sharded)
        inputs = data.center_crop(images[batch_indices], self.crop_size)
        targets = labels[batch_indices]
        model = nnx.merge(self.eval_graphdef, state.params, state.batch_stats)
        return summed_metrics(model.logits(inputs), targets)

    def _plateau_step_impl(self, plateau, value):
        _, plateau = self.plateau_tx.update(updates=(), state=plateau, value=value)
        return plateau

    def update_plateau(self, state: TrainState, value: float) -> TrainState:
        return state.replace(plateau=self._plateau_step(state.plateau, jnp.float32(value)))

    def epoch_permutation(self, epoch: int, num_examples: int) -> np.ndarray:
        """The epoch's shuffled batches ``(steps, batch)``, the same on every host; the remainder is dropped."""
        rng = np.random.default_rng((self.config.seed, epoch))
        steps = num_examples // self.config.batch_size
        return rng.permutation(num_examples)[: steps * self.config.batch_size].reshape(steps, -1).astype(np.int32)

    def step_key(self, epoch: int, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), epoch), step)

    def compile(self, state, train_images, train_labels, test_images, test_labels) -> float:
        """Compiles the steps ahead of time; returns the seconds it took."""
        start = time.perf_counter()
        batch = jax.ShapeDtypeStruct((self.config.batch_size,), jnp.int32)
        eval_batch = jax.ShapeDtypeStruct((self.config.eval_batch_size,), jnp.int32)
        self.train_step.lower(state, train_images, train_labels, batch, self.step_key(0, 0)).compile()
        self.eval_step.lower(state, test_images, test_labels, eval_batch).compile()
        return time.perf_counter() - start

    def train_epoch(
        self, state, epoch, images, labels, progress: bool, check_stop: Callable[[], None] = lambda: None
    ) -> tuple[TrainState, dict[str, float]]:
        """One epoch of train steps; ``check_stop`` runs after each step and may raise to end it early."""
        permutation = self.epoch_permutation(epoch, labels.shape[0])
        totals = None
        bar = tqdm(range(len(permutation)), desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress)
        start = time.perf_counter()
        for step in bar:
            state, metrics = self.train_step(state, images, labels, permutation[step], self.step_key(epoch, step))
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
            check_stop()
            if progress and (step + 1) % self.config.log_every_steps == 0:
                seen = jax.device_get(totals)
                bar.set_postfix(
                    loss=f"{seen['loss'] / seen['count']:.4f}",
                    acc=f"{100 * seen['correct'] / seen['count']:.1f}%",
                    img_s=f"{seen['count'] / (time.perf_counter() - start):.0f}",
                )
        totals = jax.device_get(totals)
        seconds = time.perf_counter() - start
        return state, {
            "train_loss": float(totals["loss"] / totals["count"]),
            "train_loss_sum": float(totals["loss"]),
            "train_accuracy": float(totals["correct"] / totals["count"]),
            "train_seconds": seconds,
            "train_images_per_second": float(totals["count"] / seconds),
        }

    def evaluate(self, state, images, labels, check_stop: Callable[[], None] = lambda: None) -> dict[str, float]:
        """Test loss and accuracy over all ``images``; ``check_stop`` runs after each batch."""
        num_examples = labels.shape[0]
        indices = np.arange(num_examples, dtype=np.int32)
        size = self.config.eval_batch_size
        batches = [indices[i : i + size] for i in range(0, num_examples, size)]
        start = time.perf_counter()
        totals = None
        for batch in batches:
            metrics = self.eval_step(state, images, labels, batch)
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
            check_stop()
        totals = jax.device_get(totals)
        seconds = time.perf_counter() - start
        return {
            "test_loss": float(totals["loss"] / totals["count"]),
            "test_accuracy": float(totals["correct"] / totals["count"]),
            "eval_seconds": seconds,
            "eval_images_per_second": float(totals["count"] / seconds),
        }


# --- workdir: config, checkpoints, metrics, TensorBoard ---

# Fields a rerun may change: how long and from where the run goes, not what its checkpoints mean.
# Every other field (model, shapes, NMF options, learning rates, dataset, batch sizes, seed, ...)
# must equal the workdir's config.json.
RESUMABLE_FIELDS = (
    "num_epochs",
    "min_learning_rate",
    "data_dir",
    "download",
    "log_every_steps",
    "checkpoints_to_keep",
    "distributed",
)
DAMAGED_CHECKPOINTS = "damaged_checkpoints"  # where checkpoints that cannot be restored are moved
_COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, on every file system


def _write_atomically(path: pathlib.Path, text: str) -> None:
    """Replaces ``path`` in one rename, so a crash leaves the old or the new file, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


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
      saved: a workdir's ``config.json``, as loaded by ``json``.
      config: the config of the new run.

    Returns:
      ``(field, saved value, new value)`` per differing field, by field name; a
      field missing on one side has the value ``"(absent)"`` there.
    """
    absent = "(absent)"
    old, new = _flatten(saved), _flatten(json.loads(config.to_json_best_effort()))
    return [
        (name, old.get(name, absent), new.get(name, absent))
        for name in sorted(old.keys() | new.keys())
        if name not in RESUMABLE_FIELDS and old.get(name, absent) != new.get(name, absent)
    ]


def _replaced_name(workdir: pathlib.Path) -> pathlib.Path:
    return workdir.with_name(f"{workdir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")


def _start_over(workdir: pathlib.Path) -> None:
    """Moves a previous run in ``workdir`` aside, so that the new one starts from scratch."""
    if workdir.is_dir() and any(workdir.iterdir()):
        aside = _replaced_name(workdir)
        workdir.rename(aside)
        print(f"Moved the previous run in {workdir} to {aside}; starting from scratch.", flush=True)


def _check_same_run(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Raises :class:`WorkdirError` unless ``workdir`` is new or holds a run of the same config."""
    start_over = (
        f"Train into another workdir (--workdir), or pass --start_over to move this run aside "
        f"(to {_replaced_name(workdir).name}) and start again"
    )
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"the workdir {workdir} is a file; give a directory (--workdir).")
    path = workdir / "config.json"
    if not path.exists():
        if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
            raise WorkdirError(f"{workdir} holds checkpoints but no config.json to check them against. {start_over}.")
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise WorkdirError(f"{path} cannot be read ({describe(error)}). {start_over}.") from None
    differences = config_differences(saved, config)
    if differences:
        listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in differences)
        raise WorkdirError(
            f"{workdir} holds a run with another config ({listed}). {start_over}. "
            f"A rerun may change only {', '.join(RESUMABLE_FIELDS)}."
        )


def _test_accuracy(metrics: Mapping[str, Any]) -> float:
    return metrics["test_accuracy"]


def _checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
    """Orbax checkpoints of ``workdir``: the latest ``config.checkpoints_to_keep`` and the best by test accuracy.

    Each checkpoint stores its epoch's metrics row next to the state (``best_fn``
    makes orbax write it to disk): the best one is still known after a restart,
    and a row lost in a crash can be recovered.
    """
    policies = ocp.checkpoint_managers.preservation_policy
    keep = policies.AnyPreservationPolicy(
        [
            policies.LatestN(n=config.checkpoints_to_keep),
            policies.BestN(get_metric_fn=_test_accuracy, n=1, keep_checkpoints_without_metrics=False),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep,
        best_fn=_test_accuracy,
        best_mode="max",
        create=True,
    )
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _restore_args(state: TrainState, seed: int) -> ocp.args.StandardRestore:
    return ocp.args.StandardRestore(_abstract({"state": state, "epoch": 0, "seed": seed}))


def _unfinished(step_directory: pathlib.Path) -> str | None:
    """Why a checkpoint directory is certainly incomplete, or None."""
    if not any(step_directory.iterdir()):
        return "its directory is empty"
    if not (step_directory / _COMMIT_MARKER).exists():
        return f"it has no commit marker ({_COMMIT_MARKER}): its save, or a copy of it, did not finish"
    return None


@contextlib.contextmanager
def _quiet_restore() -> Iterator[None]:
    """Silences what a failed restore leaves behind: tensorstore's reader threads report dozens of
    "Event loop is closed" errors, to file descriptor 2 and to ``sys.unraisablehook``, for a moment after
    the exception. Both go to a sink while a checkpoint is tried; the exception itself is reported."""
    sys.stderr.flush()
    saved_descriptor, saved_hook = os.dup(2), sys.unraisablehook
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        sys.unraisablehook = lambda unraisable: None
        try:
            yield
        except Exception:
            # Wait until the reader threads are quiet (the sink stops growing), at most a few seconds.
            size, deadline = -1, time.monotonic() + 5
            while os.fstat(sink.fileno()).st_size != size and time.monotonic() < deadline:
                size = os.fstat(sink.fileno()).st_size
                time.sleep(0.2)
            raise
        finally:
            sys.stderr.flush()
            sys.unraisablehook = saved_hook
            os.dup2(saved_descriptor, 2)
            os.close(saved_descriptor)


def _set_aside(step_directory: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
    """Moves a checkpoint that cannot be restored out of ``checkpoints/``, keeping it for inspection."""
    target_parent = workdir / DAMAGED_CHECKPOINTS
    target_parent.mkdir(exist_ok=True)
    target = target_parent / step_directory.name
    suffix = 1
    while target.exists():
        suffix += 1
        target = target_parent / f"{step_directory.name}.{suffix}"
    step_directory.rename(target)
    return target


def _restore_newest(
    manager: ocp.CheckpointManager, workdir: pathlib.Path, state: TrainState, seed: int, move: bool
) -> tuple[dict[str, Any] | None, list[pathlib.Path]]:
    """Restores the newest checkpoint that can be restored.

    A checkpoint that cannot (an empty or unfinished step directory, a missing
    or truncated file) is reported in one line and moved to
    ``WORKDIR/damaged_checkpoints/`` (by the process that ``move``s), and the
    one before it is tried.

    Returns:
      ``(restored, set_aside)``: the restored tree (None if no checkpoint could
      be restored) and the directories moved aside.
    """
    set_aside = []
    restored = None
    if move:  # a save cut short leaves "<epoch>.orbax-checkpoint-tmp*", which can never be restored
        for unfinished in pathlib.Path(manager.directory).glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(unfinished, ignore_errors=True)
    for step in sorted(manager.all_steps(), reverse=True):
        step_directory = pathlib.Path(manager.directory) / str(step)
        problem = _unfinished(step_directory)
        if problem is None:
            try:
                with _quiet_restore():
                    restored = manager.restore(step, args=_restore_args(state, seed))
                break
            except Exception as error:  # orbax and tensorstore raise many types for unreadable data
                problem = describe(error)
        if move:
            moved = _set_aside(step_directory, workdir)
            set_aside.append(moved)
            print(
                f"warning: the checkpoint of epoch {step} in {manager.directory} cannot be restored ({problem}); "
                f"moved it to {moved}.",
                file=sys.stderr,
                flush=True,
            )
    if set_aside:
        manager.reload()
    return restored, set_aside


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a workdir's ``metrics.jsonl``, one per epoch (a line cut short by a crash is skipped)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: {path} line {number} is not valid JSON; skipped it.", file=sys.stderr)
    return rows


def _metrics_until(workdir: pathlib.Path, epoch: int, checkpoint_row: Mapping[str, Any] | None) -> None:
    """Makes ``metrics.jsonl`` end at the checkpoint a run resumes from: drops later rows, and adds
    the checkpoint's own row if a crash came between saving it and writing the file."""
    rows = [row for row in read_metrics(workdir) if row["epoch"] <= epoch]
    if epoch and (not rows or rows[-1]["epoch"] < epoch) and checkpoint_row and "epoch" in checkpoint_row:
        rows.append(dict(checkpoint_row))
    _write_atomically(workdir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


def _checkpoint_row(manager: ocp.CheckpointManager, epoch: int) -> Mapping[str, Any] | None:
    """The metrics row saved with a checkpoint (None for epoch 0 or when it cannot be read)."""
    if not epoch:
        return None
    try:
        return manager.metrics(epoch)
    except Exception:  # a damaged metadata file only costs the row's recovery
        return None


def _format_epoch(row: dict[str, Any], num_epochs: int) -> str:
    return (
        f"epoch {row['epoch']:>3}/{num_epochs}  "
        f"train loss {row['train_loss']:.4f} acc {100 * row['train_accuracy']:5.2f}%  "
        f"test loss {row['test_loss']:.4f} acc {100 * row['test_accuracy']:5.2f}%  "
        f"lr {row['learning_rate_module_a']:.1e}  "
        f"{row['train_images_per_second']:.0f} img/s train, {row['eval_images_per_second']:.0f} img/s eval  "
        f"{row['epoch_seconds']:.1f} s"
    )


class _StopSignals:
    """Turns the first SIGINT or SIGTERM into a request to stop at the next step, so that no save
    is cut short; a second signal acts as usual (KeyboardInterrupt, termination)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def _handle(self, number, frame) -> None:
        self.received = number
        for previous_number, handler in self._previous.items():
            signal.signal(previous_number, handler)
        print(
            f"\n{signal.Signals(number).name}: stopping at the next step (a second one stops at once).",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its ``config.json``)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise MissingFileError(f"{path} does not exist: is {workdir} a workdir written by train.py?")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except ValueError as error:
        raise WorkdirError(f"{path} cannot be read ({describe(error)}).") from None


def config_from_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file such as ``configs/cnmf_1x1.py``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} does not exist (e.g. configs/cnmf_1x1.py).")
    module_spec = importlib.util.spec_from_file_location(f"nmfjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted fields replaced, e.g. ``{"nmf.iterations": 5, "width": 2}``."""
    config = ml_collections.ConfigDict(config.to_dict())
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


def load_checkpoint(
    workdir: str | pathlib.Path, step: int | str | None = None
) -> tuple[ml_collections.ConfigDict, models.Network, TrainState, int]:
    """Restores a trained network from a workdir.

    Args:
      workdir: a directory written by :func:`train_and_evaluate`.
      step: an epoch, ``"best"`` (highest test accuracy), or ``"latest"`` / ``None``.

    Returns:
      ``(config, model, state, epoch)``: the model carries the checkpoint's
      parameters and BatchNorm statistics.
    """
    if isinstance(step, str) and step not in ("best", "latest"):
        raise ConfigError(f'step must be an epoch, "best" or "latest", got {step!r}.')
    workdir = pathlib.Path(workdir)
    config = load_config(workdir)
    spec = network_spec(config)
    trainer = Trainer(config, spec, data_mesh())
    manager = _checkpoint_manager(workdir, config)
    try:
        kept = sorted(manager.all_steps())
        if step == "best":
            rows = [row for row in read_metrics(workdir) if row["epoch"] in kept]
            epoch = max(rows, key=lambda row: row["test_accuracy"])["epoch"] if rows else None
        else:
            epoch = manager.latest_step() if step in (None, "latest") else step
        if epoch is None or epoch not in kept:
            raise MissingFileError(
                f"no checkpoint of epoch {epoch} in {workdir / 'checkpoints'} (it holds epochs {kept})."
                if epoch is not None
                else f"no checkpoint in {workdir / 'checkpoints'}: train with train.py first."
            )
        try:
            with _quiet_restore():
                restored = manager.restore(epoch, args=_restore_args(trainer.initial_state, 0))
        except Exception as error:  # orbax and tensorstore raise many types for unreadable data
            raise WorkdirError(
                f"the checkpoint of epoch {epoch} in {workdir / 'checkpoints'} cannot be restored ({describe(error)}); "
                "pick another with --step, or rerun train.py on the workdir, which moves damaged checkpoints aside."
            ) from None
    finally:
        manager.close()
    state = restored["state"]
    model = nnx.merge(trainer.graphdef, state.params, state.batch_stats)
    return config, model, state, int(epoch)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, start_over: bool = False
) -> dict[str, Any]:
    """Trains ``config``'s network, resuming from the workdir's newest checkpoint.

    Writes to ``workdir``: ``config.json``, ``checkpoints/`` (orbax, every epoch:
    the latest ``config.checkpoints_to_keep`` and the best by test accuracy),
    ``metrics.jsonl`` (one JSON object per epoch) and ``tensorboard/``.

    A rerun must use the same config but for :data:`RESUMABLE_FIELDS`.
    Checkpoints that cannot be restored are moved to
    ``WORKDIR/damaged_checkpoints/`` and the one before them is used. The first
    SIGINT or SIGTERM stops training at the next step, after any save in
    progress has finished, and raises :class:`~nmfjax.errors.TrainingInterrupted`.

    Args:
      config: a config as ``configs/default.py`` builds it.
      workdir: where the run is written.
      start_over: move a previous run in ``workdir`` to ``WORKDIR.replaced-TIME``
        and train from scratch.

    Returns:
      The last epoch's metrics row (empty if no epoch was left to run).

    Raises:
      ConfigError: a bad config field.
      WorkdirError: ``workdir`` holds a run of another config, or epochs
        without a checkpoint that can be restored.
      DatasetUnavailableError: the data is missing and cannot be prepared.
      TrainingInterrupted: SIGINT or SIGTERM; the latest complete checkpoint is intact.
    """
    spec = validate_config(config)
    workdir = pathlib.Path(workdir)
    is_main_process = jax.process_index() == 0
    with _StopSignals() as signals:
        if start_over and is_main_process:
            _start_over(workdir)
        _check_same_run(workdir, config)
        if is_main_process:
            workdir.mkdir(parents=True, exist_ok=True)
            _write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")

        trainer = Trainer(config, spec, data_mesh())
        manager = _checkpoint_manager(workdir, config)
        try:
            return _train(config, workdir, trainer, manager, signals, is_main_process)
        finally:
            manager.wait_until_finished()  # a save in progress completes before the process ends
            manager.close()


def _train(config, workdir, trainer, manager, signals, is_main_process) -> dict[str, Any]:
    restored, set_aside = _restore_newest(manager, workdir, trainer.initial_state, config.seed, is_main_process)
    state, completed = trainer.initial_state, 0
    if restored is not None:
        state, completed = restored["state"], int(restored["epoch"])
    rows = read_metrics(workdir)
    recorded = max((row["epoch"] for row in rows), default=0)
    damaged = workdir / DAMAGED_CHECKPOINTS
    if restored is None and (set_aside or recorded > 1):
        # (A crash while the first epoch was saved leaves its row and no checkpoint: that run starts again.)
        raise WorkdirError(
            f"no checkpoint in {workdir / 'checkpoints'} can be restored, but metrics.jsonl records epochs up to "
            f"{recorded}" + (f" (the damaged ones are in {damaged})" if damaged.is_dir() else "") + ". "
            f"Put intact checkpoints into {workdir / 'checkpoints'}, train into another workdir (--workdir), "
            "or pass --start_over to move this run aside and train from scratch."
        )
    if is_main_process:
        _metrics_until(workdir, completed, _checkpoint_row(manager, completed))
        if completed:
            print(f"Resumed from {workdir / 'checkpoints'} after epoch {completed}.", flush=True)
    if completed >= config.num_epochs:
        if is_main_process:
            print(f"{workdir} is trained for {completed} epochs already (config.num_epochs={config.num_epochs}).")
        return {}

    def check_stop() -> None:
        if signals.received is not None:
            done = f"the checkpoint of epoch {completed} is complete" if completed else "no epoch was complete yet"
            raise TrainingInterrupted(
                f"interrupted by {signal.Signals(signals.received).name} during epoch {completed + 1}: {done} "
                f"in {workdir / 'checkpoints'}; rerun the same command to resume.",
                signals.received,
            )

    train = data.load_split(
        config.dataset, "train", data_dir=config.data_dir, download=config.download, limit=config.num_train_examples
    )
    test = data.load_split(config.dataset, "test", data_dir=config.data_dir, download=config.download)
    check_stop()
    train_images, train_labels = trainer.put_replicated(train.images), trainer.put_replicated(train.labels)
    test_images, test_labels = trainer.put_replicated(test.images), trainer.put_replicated(test.labels)
    compile_seconds = trainer.compile(state, train_images, train_labels, test_images, test_labels)
    if is_main_process:
        parameters = sum(leaf.size for leaf in jax.tree.leaves(state.params))
        print(
            f"{config.model}: {parameters:,} parameters, "
            f"{len(train)} train / {len(test)} test images, {jax.device_count()} device(s), "
            f"compiled in {compile_seconds:.1f} s.",
            flush=True,
        )

    writer = None
    if is_main_process:
        from tensorboardX import SummaryWriter  # TensorFlow-free event writer

        writer = SummaryWriter(str(workdir / "tensorboard"))
    row: dict[str, Any] = {}
    max_rate = max(config.learning_rates[group] for group in LEARNING_RATE_GROUPS)
    try:
        for epoch in range(completed + 1, config.num_epochs + 1):
            check_stop()
            if max_rate * float(state.plateau.scale) < config.min_learning_rate:
                print(f"Every learning rate is below {config.min_learning_rate}: stopping.")
                break
            epoch_start = time.perf_counter()
            rates = learning_rates(config, state)
            state, train_metrics = trainer.train_epoch(
                state, epoch, train_images, train_labels, is_main_process, check_stop
            )
            if not math.isfinite(train_metrics["train_loss"]):
                raise TrainingDiverged(
                    f"epoch {epoch}: the training loss is {train_metrics['train_loss']}; nothing of this epoch was "
                    f"saved (the latest checkpoint in {workdir / 'checkpoints'} is still finite). Lower "
                    "config.learning_rates, or use config.nmf.gradient='approx', and rerun to resume."
                )
            test_metrics = trainer.evaluate(state, test_images, test_labels, check_stop)
            state = trainer.update_plateau(state, {**train_metrics, **test_metrics}[config.plateau.metric])
            row = {
                "epoch": epoch,
                **train_metrics,
                **test_metrics,
                **{f"learning_rate_{group}": rate for group, rate in rates.items()},
                "compile_seconds": compile_seconds,
                "epoch_seconds": time.perf_counter() - epoch_start,
            }
            # The row goes into the checkpoint too, so that a crash between the two writes loses nothing.
            manager.save(
                epoch, args=ocp.args.StandardSave({"state": state, "epoch": epoch, "seed": config.seed}), metrics=row
            )
            completed = epoch
            if is_main_process:
                with open(workdir / "metrics.jsonl", "a") as metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                for name, value in row.items():
                    if name != "epoch" and isinstance(value, float) and math.isfinite(value):
                        writer.add_scalar(name, value, epoch)
                writer.flush()
                print(_format_epoch(row, config.num_epochs), flush=True)
    finally:
        if writer is not None:
            writer.close()
    return row
