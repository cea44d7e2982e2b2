"""Training of the paper's networks (arXiv 2503.20398, section 2.6, and the authors' code).

``train_and_evaluate(config, workdir)`` runs the whole recipe: the composite
CE + MSE loss on the softmax output (paper eq. 21), Adam with one learning rate
per parameter group, the reduce-on-plateau rule after each epoch, orbax
checkpoints every epoch (resumed automatically), ``metrics.jsonl`` and
TensorBoard events in the workdir (see :mod:`nmfjax.workdirs`). The train step
runs data-parallel over every visible device (see :mod:`nmfjax.parallel`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import pathlib
import signal
import sys
import threading
import time
import types
import zipfile
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
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from nmfjax import configuration, data, evaluation, models, parallel, workdirs
from nmfjax.errors import ConfigError, MissingFileError, TrainingDiverged, TrainingInterrupted, WorkdirError, describe
from nmfjax.evaluation import Metrics

# --- loss, optimiser, state ---


def make_optimizer(config: ml_collections.ConfigDict, params: nnx.State) -> optax.GradientTransformation:
    """Adam (PyTorch defaults) with one learning rate per parameter group: module a's weights,
    the 1x1 mixing convolutions and BatchNorm (``config.learning_rates``), chosen by variable
    type (:func:`nmfjax.models.parameter_group`).
    """
    is_variable = lambda value: isinstance(value, nnx.Variable)  # noqa: E731
    # A label for each array, in the structure of ``params``.
    labels = jax.tree.map(
        lambda variable: jax.tree.map(lambda _: models.parameter_group(variable), variable), params, is_leaf=is_variable
    )
    transforms = {group: optax.adam(config.learning_rates[group]) for group in models.PARAMETER_GROUPS}
    return optax.multi_transform(transforms, labels)


def make_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """The learning-rate scale: ``config.plateau``'s reduce-on-plateau rule, as PyTorch's ReduceLROnPlateau."""
    # PyTorch's ReduceLROnPlateau reduces after more than `patience` bad epochs,
    # optax's after exactly `patience`: shift by one to match the authors' code.
    return optax.contrib.reduce_on_plateau(
        factor=config.plateau.factor, patience=config.plateau.patience + 1, rtol=config.plateau.rtol, atol=0.0
    )


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds of a run: parameters, BatchNorm statistics and optimiser states."""

    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    plateau: optax.contrib.ReduceLROnPlateauState


def learning_rates(config: ml_collections.ConfigDict, state: TrainState) -> dict[str, float]:
    """Each parameter group's learning rate now: its ``config.learning_rates`` entry times the plateau scale."""
    scale = float(state.plateau.scale)
    return {group: config.learning_rates[group] * scale for group in models.PARAMETER_GROUPS}


# --- the trainer ---


class Trainer:
    """The jitted train step of one config and the evaluator of its network, over a mesh."""

    def __init__(self, config: ml_collections.ConfigDict, spec: models.NetworkSpec, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        model = models.build(spec, config.seed)
        self.graphdef, params, batch_stats = models.split_state(model)
        model.eval()
        eval_graphdef, _, _ = models.split_state(model)
        self.crop_size = spec.input_shape[0]
        self.evaluator = evaluation.Evaluator(eval_graphdef, self.crop_size, config.eval_batch_size, mesh)
        self.tx = make_optimizer(config, params)
        self.plateau_tx = make_plateau(config)
        state = TrainState(
            params=params,
            batch_stats=batch_stats,
            opt_state=self.tx.init(params),
            plateau=self.plateau_tx.init(jnp.zeros((), jnp.float32)),
        )
        self.initial_state = jax.device_put(state, parallel.replicated(mesh))
        self.one_program_at_a_time = parallel.one_program_at_a_time(mesh)
        self.train_step = jax.jit(self._train_step_impl, donate_argnums=0)
        self._plateau_step = jax.jit(self._plateau_step_impl)

    def put_replicated(self, array: np.ndarray) -> jax.Array:
        """A host array replicated on every device of the mesh (multi-host too)."""
        return parallel.put_replicated(self.mesh, array)

    def _train_step_impl(
        self,
        state: TrainState,
        images: jax.Array,
        labels: jax.Array,
        batch_indices: jax.Array,
        key: jax.Array,
        totals: Metrics,
    ) -> tuple[TrainState, Metrics]:
        """One Adam step on a batch; returns the new state and ``totals`` plus the batch's metric sums."""
        batch_indices = parallel.split_batch(batch_indices, self.mesh)
        inputs = data.augment(key, images[batch_indices], self.crop_size, self.config.augment)
        targets = labels[batch_indices]
        loss_fn = lambda params: evaluation.batch_loss(self.graphdef, params, state.batch_stats, inputs, targets)  # noqa: E731
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        # Adam's step is linear in the learning rate, so scaling it scales every group's rate.
        updates = jax.tree.map(lambda update: update * state.plateau.scale, updates)
        state = dataclasses.replace(
            state, params=optax.apply_updates(state.params, updates), batch_stats=batch_stats, opt_state=opt_state
        )
        return state, evaluation.add_metrics(totals, evaluation.summed_metrics(logits, targets, loss))

    def _plateau_step_impl(
        self, plateau: optax.contrib.ReduceLROnPlateauState, value: jax.Array
    ) -> optax.contrib.ReduceLROnPlateauState:
        _, plateau = self.plateau_tx.update(updates=(), state=plateau, value=value)
        return plateau

    def update_plateau(self, state: TrainState, value: float) -> TrainState:
        """The plateau rule after an epoch whose monitored metric was ``value``."""
        return dataclasses.replace(state, plateau=self._plateau_step(state.plateau, jnp.float32(value)))

    def epoch_permutation(self, epoch: int, num_examples: int) -> np.ndarray:
        """The epoch's shuffled batches ``(steps, batch)``, the same on every host; the remainder is dropped."""
        rng = np.random.default_rng((self.config.seed, epoch))
        steps = num_examples // self.config.batch_size
        return rng.permutation(num_examples)[: steps * self.config.batch_size].reshape(steps, -1).astype(np.int32)

    def step_key(self, epoch: int, step: int) -> jax.Array:
        """The augmentation key of one step: a function of the seed, the epoch and the step only."""
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), epoch), step)

    def compile(
        self,
        state: TrainState,
        train_images: jax.Array,
        train_labels: jax.Array,
        test_images: jax.Array,
        test_labels: jax.Array,
    ) -> float:
        """Compiles the steps ahead of time; returns the seconds it took."""
        start = time.perf_counter()
        batch = jax.ShapeDtypeStruct((self.config.batch_size,), jnp.int32)
        eval_batch = jax.ShapeDtypeStruct((self.config.eval_batch_size,), jnp.int32)
        totals = evaluation.no_metrics(self.mesh)
        self.train_step.lower(state, train_images, train_labels, batch, self.step_key(0, 0), totals).compile()
        self.evaluator.step.lower(
            state.params, state.batch_stats, test_images, test_labels, eval_batch, totals, np.int32(0)
        ).compile()
        return time.perf_counter() - start

    def train_epoch(
        self,
        state: TrainState,
        epoch: int,
        images: jax.Array,
        labels: jax.Array,
        progress: bool,
        check_stop: Callable[[], None] = lambda: None,
    ) -> tuple[TrainState, dict[str, float]]:
        """One epoch of train steps; ``check_stop`` runs after each step and may raise to end it early."""
        permutation = self.epoch_permutation(epoch, labels.shape[0])
        totals = evaluation.no_metrics(self.mesh)
        bar = tqdm(range(len(permutation)), desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress)
        start = time.perf_counter()
        for step in bar:
            key = self.step_key(epoch, step)
            state, totals = self.train_step(state, images, labels, permutation[step], key, totals)
            if self.one_program_at_a_time:
                jax.block_until_ready(totals)
            check_stop()
            if progress and (step + 1) % self.config.log_every_steps == 0:
                seen = evaluation.mean_metrics(totals)
                bar.set_postfix(
                    loss=f"{seen['loss']:.4f}",
                    acc=f"{100 * seen['accuracy']:.1f}%",
                    img_s=f"{seen['count'] / (time.perf_counter() - start):.0f}",
                )
        means = evaluation.mean_metrics(totals)
        seconds = time.perf_counter() - start
        return state, {
            "train_loss": means["loss"],
            "train_loss_sum": means["loss_sum"],
            "train_accuracy": means["accuracy"],
            "train_seconds": seconds,
            "train_images_per_second": means["count"] / seconds,
        }

    def evaluate(
        self, state: TrainState, images: jax.Array, labels: jax.Array, check_stop: Callable[[], None] = lambda: None
    ) -> dict[str, float]:
        """Test loss and accuracy over all ``images``; ``check_stop`` runs after each batch."""
        result = self.evaluator.evaluate(state.params, state.batch_stats, images, labels, check_stop=check_stop)
        return {
            "test_loss": result["loss"],
            "test_accuracy": result["accuracy"],
            "eval_seconds": result["seconds"],
            "eval_images_per_second": result["images_per_second"],
        }


# --- a run in a workdir ---


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _restore_args(state: TrainState, seed: int) -> ocp.args.StandardRestore:
    return ocp.args.StandardRestore(_abstract({"state": state, "epoch": 0, "seed": seed}))


def epoch_line(row: dict[str, Any], num_epochs: int) -> str:
    """The line ``train.py`` prints after an epoch, from its row of ``metrics.jsonl``."""
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
    is cut short; a second signal acts as usual (KeyboardInterrupt, termination).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def _handle(self, number: int, frame: types.FrameType | None) -> None:
        self.received = number
        for previous_number, handler in self._previous.items():
            signal.signal(previous_number, handler)
        print(
            f"\n{signal.Signals(number).name}: stopping at the next step (a second one stops at once).",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


#: The weights file of an exported network (:func:`export_network`), beside its ``config.json``.
EXPORTED_WEIGHTS = "weights.npz"


def is_exported_network(directory: str | pathlib.Path) -> bool:
    """Whether ``directory`` holds an exported network (:func:`export_network`: one epoch's
    weights, no checkpoints) rather than a workdir of ``train.py``.
    """
    directory = pathlib.Path(directory)
    return (directory / EXPORTED_WEIGHTS).exists() and not (directory / "checkpoints").exists()


_STATE_PARTS = ("params", "batch_stats")


def _array_name(part: str, path: tuple) -> str:
    return "/".join(map(str, (part, *path)))


def _flat_arrays(state: TrainState) -> dict[str, np.ndarray]:
    """``{"params/blocks/0/module_a/kernel": array, "batch_stats/...": ...}`` of a state's network."""
    arrays = {}
    for part in _STATE_PARTS:
        for path, variable in nnx.to_flat_state(getattr(state, part)):
            arrays[_array_name(part, path)] = np.asarray(jax.device_get(variable[...]))
    return arrays


def _with_arrays(state: TrainState, arrays: Mapping[str, np.ndarray], source: pathlib.Path) -> TrainState:
    """``state`` with its network's variables replaced by ``arrays`` (as :func:`_flat_arrays` names them)."""
    expected = {name: array.shape for name, array in _flat_arrays(state).items()}
    missing, extra = sorted(expected.keys() - arrays.keys()), sorted(arrays.keys() - expected.keys())
    wrong = sorted(
        f"{name} {arrays[name].shape} (expected {shape})"
        for name, shape in expected.items()
        if name in arrays and arrays[name].shape != shape
    )
    if missing or extra or wrong:
        raise WorkdirError(
            f"{source} does not hold the network of its config.json: "
            + "; ".join(
                f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
                if names
            )
            + ". Export it again with python -m nmfjax.experiments export."
        )
    parts = {}
    for part in _STATE_PARTS:
        flat = nnx.to_flat_state(getattr(state, part))
        parts[part] = nnx.from_flat_state(
            [(path, variable.replace(jnp.asarray(arrays[_array_name(part, path)]))) for path, variable in flat]
        )
    return dataclasses.replace(state, **parts)


def export_network(
    workdir: str | pathlib.Path, output: str | pathlib.Path, step: int | str | None = "latest"
) -> pathlib.Path:
    """Writes a trained network to ``output`` in the exported format, which
    :func:`load_checkpoint` (and so every analysis of ``nmfjax.experiments``) reads like a workdir.

    ``output`` receives ``config.json`` (the run's config, with ``data_dir``
    cleared: a path on the machine that trained it), ``metrics.jsonl`` (a copy)
    and :data:`EXPORTED_WEIGHTS`, a NumPy ``.npz`` archive with one
    float32 array per variable of the network, named by its path
    (``params/blocks/0/module_a/kernel``, ``batch_stats/blocks/0/norm_a/mean``,
    ...), and ``epoch``, the epoch they are from. Optimiser and plateau state
    are left out (CNMF+1x1: 0.7 MB instead of 2 MB).

    Args:
      workdir: a directory written by :func:`train_and_evaluate`.
      output: the directory to write (created; its three files are replaced).
      step: the checkpoint, as for :func:`load_checkpoint`.

    Returns:
      The path of the weights file.
    """
    workdir, output = pathlib.Path(workdir), pathlib.Path(output)
    config, _, state, epoch = load_checkpoint(workdir, step)
    config.data_dir = None  # a path on the machine that trained it; elsewhere tfds's default directory
    workdirs.write_output(output / "config.json", config.to_json_best_effort(indent=2) + "\n")
    workdirs.write_output(output / "metrics.jsonl", (workdir / "metrics.jsonl").read_text())
    weights = io.BytesIO()
    arrays: dict[str, Any] = {"epoch": np.int32(epoch), **_flat_arrays(state)}
    np.savez(weights, **arrays)
    return workdirs.write_output(output / EXPORTED_WEIGHTS, weights.getvalue())


def _load_exported(directory: pathlib.Path, step: int | str | None, initial: TrainState) -> tuple[TrainState, int]:
    path = directory / EXPORTED_WEIGHTS
    try:
        with np.load(path) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise WorkdirError(f"{path} cannot be read ({describe(error)}); export the network again.") from None
    if "epoch" not in arrays:
        raise WorkdirError(f"{path} names no epoch: it is not an exported network; export it again.")
    epoch = int(arrays.pop("epoch"))
    rows = workdirs.read_metrics(directory)
    best = max(rows, key=lambda row: row["test_accuracy"])["epoch"] if rows else epoch
    if step not in (None, "latest", epoch) and not (step == "best" and best == epoch):
        raise MissingFileError(
            f"{directory} holds the exported weights of epoch {epoch} only"
            + (f" (the best test accuracy was epoch {best}'s)" if step == "best" else "")
            + f', not {step!r}: ask for step {epoch} or "latest".'
        )
    return _with_arrays(initial, arrays, path), epoch


def load_checkpoint(
    workdir: str | pathlib.Path, step: int | str | None = None, *, batch_norm_statistics: str | None = None
) -> tuple[ml_collections.ConfigDict, models.Network, TrainState, int]:
    """Restores a trained network from a workdir or from an exported network (:func:`export_network`).

    Args:
      workdir: a directory written by :func:`train_and_evaluate`, or by
        :func:`export_network` (``config.json`` and :data:`EXPORTED_WEIGHTS`).
      step: an epoch, ``"best"`` (highest test accuracy), or ``"latest"`` / ``None``.
        An exported network holds one epoch: ``"best"`` is it only if
        ``metrics.jsonl`` records no better one.
      batch_norm_statistics: None keeps the run's ``config.model.batch_norm_statistics``;
        ``"running"`` makes BatchNorm use the averages it kept during training,
        so that an image's class no longer depends on the other images in its
        batch (with the authors' ``"batch"`` statistics a single image is
        normalised by itself, which costs CNMF+1x1 about half its accuracy).

    Returns:
      ``(config, model, state, epoch)``: the config (with ``batch_norm_statistics``
      applied) and the model in evaluation mode (``model.train()`` switches),
      carrying the checkpoint's parameters and BatchNorm statistics. An exported network has no
      optimiser state: ``state.opt_state`` and ``state.plateau`` are those of a
      new run, so training from it starts Adam afresh.
    """
    if isinstance(step, str) and step not in ("best", "latest"):
        raise ConfigError(f'step must be an epoch, "best" or "latest", got {step!r}.')
    workdir = pathlib.Path(workdir)
    config = configuration.load_config(workdir)
    if batch_norm_statistics is not None:
        config.model.batch_norm_statistics = batch_norm_statistics
    spec = configuration.network_spec(config)
    trainer = Trainer(config, spec, parallel.data_mesh())
    if is_exported_network(workdir):
        state, epoch = _load_exported(workdir, step, trainer.initial_state)
    else:
        state, epoch = _restore_checkpoint(workdir, config, step, trainer.initial_state)
    model = nnx.merge(trainer.graphdef, state.params, state.batch_stats)
    model.eval()
    return config, model, state, epoch


def _restore_checkpoint(
    workdir: pathlib.Path, config: ml_collections.ConfigDict, step: int | str | None, initial: TrainState
) -> tuple[TrainState, int]:
    manager = workdirs.checkpoint_manager(workdir, config.checkpoints_to_keep)
    try:
        kept = sorted(manager.all_steps())
        if step == "best":
            rows = [row for row in workdirs.read_metrics(workdir) if row["epoch"] in kept]
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
            with workdirs.quiet_failure():
                restored = manager.restore(epoch, args=_restore_args(initial, 0))
        except Exception as error:  # orbax and tensorstore raise many types for unreadable data
            raise WorkdirError(
                f"the checkpoint of epoch {epoch} in {workdir / 'checkpoints'} cannot be restored ({describe(error)}); "
                "pick another with --step, or rerun train.py on the workdir, which moves damaged checkpoints aside."
            ) from None
    finally:
        manager.close()
    return restored["state"], int(epoch)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, start_over: bool = False
) -> dict[str, Any]:
    """Trains ``config``'s network, resuming from the workdir's newest checkpoint.

    Writes to ``workdir``: ``config.json``, ``checkpoints/`` (orbax, every epoch:
    the latest ``config.checkpoints_to_keep`` and the best by test accuracy),
    ``metrics.jsonl`` (one JSON object per epoch) and ``tensorboard/``.

    A rerun must use the same config but for
    :data:`~nmfjax.configuration.RESUMABLE_FIELDS`.
    Checkpoints that cannot be restored are moved to
    ``WORKDIR/damaged_checkpoints/`` and the one before them is used. The first
    SIGINT or SIGTERM stops training at the next step, after any save in
    progress has finished, and raises :class:`~nmfjax.errors.TrainingInterrupted`.

    Args:
      config: a config as :func:`nmfjax.configuration.default_config` builds it.
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
    spec = configuration.validate_config(config)
    workdir = pathlib.Path(workdir)
    is_main_process = jax.process_index() == 0
    new_workdir = not workdir.exists()
    if is_main_process:
        source = config.data_dir or "tfds's default data directory"
        print(f"Training {config.model.architecture} into {workdir} ({config.dataset} from {source}).", flush=True)
    try:
        with _StopSignals() as signals, _workdir_lock(workdir, is_main_process):
            if start_over and is_main_process:
                workdirs.start_over(workdir)
            workdirs.check_same_run(workdir, config)
            # The data first: a run that cannot read them writes nothing into its workdir.
            splits = _read_splits(config)
            if is_main_process:
                with workdirs.storage_errors(workdir / "config.json", "Free space, or train into another --workdir."):
                    workdirs.write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")

            trainer = Trainer(config, spec, parallel.data_mesh())
            manager = workdirs.checkpoint_manager(workdir, config.checkpoints_to_keep)
            try:
                row = _train(config, workdir, trainer, manager, signals, is_main_process, splits)
            except BaseException:
                # The run's own error is the one to report, not what finishing a failed save says again.
                with contextlib.suppress(Exception), workdirs.quiet_failure():
                    manager.wait_until_finished()
                    manager.close()
                raise
            manager.close()
    except BaseException:
        if new_workdir and is_main_process:
            with contextlib.suppress(OSError):
                workdir.rmdir()  # only if empty: the run stopped before writing anything
        raise
    if is_main_process:
        print(run_summary(workdir), flush=True)
    return row


def _read_splits(config: ml_collections.ConfigDict) -> tuple[data.Split, data.Split]:
    """The run's train and test splits, decoded; a train split smaller than a batch is a ConfigError."""
    train = data.load_split(
        config.dataset, "train", data_dir=config.data_dir, download=config.download, limit=config.num_train_examples
    )
    test = data.load_split(config.dataset, "test", data_dir=config.data_dir, download=config.download)
    if len(train) < config.batch_size:
        raise ConfigError(
            f"the train split of {config.dataset!r} holds {len(train)} examples, fewer than config.batch_size="
            f"{config.batch_size}: an epoch would have no step. Lower config.batch_size, or use a larger dataset."
        )
    return train, test


def run_summary(workdir: str | pathlib.Path) -> str:
    """What ``train.py`` prints at the end of a run: its best and last test accuracy with their epochs,
    the files it wrote, and the commands that look at it.
    """
    workdir = pathlib.Path(workdir)
    rows = workdirs.read_metrics(workdir)
    if not rows:
        return f"{workdir} holds no finished epoch."
    best = max(rows, key=lambda row: row["test_accuracy"])
    last = rows[-1]
    commands = [
        (f"python -m nmfjax.plots {workdir}", "learning curves (PNG)"),
        (f"python -m nmfjax.experiments compare {workdir} OTHER_WORKDIR", "runs side by side"),
        (f"python -m nmfjax.experiments evaluate {workdir}", "test accuracy of the best epoch"),
        (f"tensorboard --logdir {workdir}", ""),
    ]
    width = max(len(command) for command, _ in commands)
    return "\n".join(
        [
            f"Best test accuracy {100 * best['test_accuracy']:.2f}% (epoch {best['epoch']}), "
            f"last {100 * last['test_accuracy']:.2f}% (epoch {last['epoch']}).",
            f"Written to {workdir}/: config.json, metrics.jsonl (a line per epoch), checkpoints/, tensorboard/.",
            "To look at it:",
            *(f"  {command.ljust(width)}   # {what}".rstrip(" #") for command, what in commands),
        ]
    )


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path, is_main_process: bool) -> Iterator[None]:
    """Process 0 holds the workdir's lock for the run; every process stops if it cannot."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if is_main_process:
            try:
                stack.enter_context(workdirs.locked(workdir))
            except WorkdirError as error:
                refusal = error
        if jax.process_count() > 1:
            refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
            if refused and refusal is None:
                raise WorkdirError(f"process 0 could not take the lock of {workdir}: see its error.")
        if refusal is not None:
            raise refusal
        yield


def _train(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    trainer: Trainer,
    manager: ocp.CheckpointManager,
    signals: _StopSignals,
    is_main_process: bool,
    splits: tuple[data.Split, data.Split],
) -> dict[str, Any]:
    restore_args = _restore_args(trainer.initial_state, config.seed)
    restored, set_aside = workdirs.restore_newest(manager, workdir, restore_args, is_main_process)
    state, completed = trainer.initial_state, 0
    if restored is not None:
        state, completed = restored["state"], int(restored["epoch"])
    rows = workdirs.read_metrics(workdir)
    recorded = max((row["epoch"] for row in rows), default=0)
    damaged = workdir / workdirs.DAMAGED_CHECKPOINTS
    if restored is None and (set_aside or recorded > 1):
        # (A crash while the first epoch was saved leaves its row and no checkpoint: that run starts again.)
        raise WorkdirError(
            f"no checkpoint in {workdir / 'checkpoints'} can be restored, but metrics.jsonl records epochs up to "
            f"{recorded}" + (f" (the damaged ones are in {damaged})" if damaged.is_dir() else "") + ". "
            f"Put intact checkpoints into {workdir / 'checkpoints'}, train into another workdir (--workdir), "
            "or pass --start_over to move this run aside and train from scratch."
        )
    if is_main_process:
        workdirs.cut_metrics_at(workdir, completed, workdirs.checkpoint_row(manager, completed))
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

    train, test = splits
    check_stop()
    train_images, train_labels = trainer.put_replicated(train.images), trainer.put_replicated(train.labels)
    test_images, test_labels = trainer.put_replicated(test.images), trainer.put_replicated(test.labels)
    compile_seconds = trainer.compile(state, train_images, train_labels, test_images, test_labels)
    if is_main_process:
        parameters = sum(leaf.size for leaf in jax.tree.leaves(state.params))
        print(
            f"{config.model.architecture}: {parameters:,} parameters, "
            f"{len(train)} train / {len(test)} test images, {jax.device_count()} device(s)"
            + (f" in {jax.process_count()} processes, " if jax.process_count() > 1 else ", ")
            + f"compiled in {compile_seconds:.1f} s.",
            flush=True,
        )

    scalars = workdirs.ScalarLog(workdir / "tensorboard") if is_main_process else None
    row: dict[str, Any] = {}
    max_rate = max(config.learning_rates[group] for group in models.PARAMETER_GROUPS)
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
                    "config.learning_rates, or use config.model.nmf.gradient='approx', and rerun to resume."
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
            with workdirs.saving_checkpoint(manager, epoch, completed, state):
                manager.save(
                    epoch,
                    args=ocp.args.StandardSave({"state": state, "epoch": epoch, "seed": config.seed}),
                    metrics=row,
                )
                manager.wait_until_finished()  # a write that fails is reported now, for this epoch
            completed = epoch
            if is_main_process:
                remedy = (
                    f"The checkpoint of epoch {epoch} is complete and holds the epoch's metrics: free space and rerun "
                    f"the same command, which resumes after epoch {epoch} and writes its row to metrics.jsonl."
                )
                with workdirs.storage_errors(workdir / "metrics.jsonl", remedy):
                    workdirs.append_metrics(workdir, row)
                assert scalars is not None
                with workdirs.storage_errors(scalars.directory, f"{remedy} (TensorBoard will lack epoch {epoch}.)"):
                    scalars.add(row, epoch)
                print(epoch_line(row, config.num_epochs), flush=True)
    finally:
        if scalars is not None:
            scalars.close()
    return row
