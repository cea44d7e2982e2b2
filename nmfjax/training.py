"""A training run of the paper's networks in a workdir (arXiv 2503.20398, section 2.6).

``train_and_evaluate(config, workdir)`` runs the recipe epoch by epoch: the
data are read (before anything is written), the run resumes from the workdir's
newest checkpoint (:mod:`nmfjax.checkpoints`), each epoch trains with
:class:`nmfjax.trainer.Trainer`, tests, applies the plateau rule, saves a
checkpoint and appends its row to ``metrics.jsonl`` and TensorBoard
(:mod:`nmfjax.workdirs`). SIGINT and SIGTERM stop it at the next step.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import shutil
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from nmfjax import checkpoints, configuration, cpu_kernel, data, kernels, models, ops, parallel, workdirs
from nmfjax.errors import ConfigError, TrainingDiverged, TrainingInterrupted, WorkdirError, quiet_failure
from nmfjax.trainer import Trainer, TrainState, learning_rates

# Where they were documented before they got modules of their own; nmfjax.checkpoints is their home.
load_checkpoint = checkpoints.load_checkpoint
export_network = checkpoints.export_network
EXPORTED_WEIGHTS = checkpoints.EXPORTED_WEIGHTS


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
    config = configuration.with_data_defaults(config)
    workdir = pathlib.Path(workdir)
    is_main_process = jax.process_index() == 0
    new_workdir = not workdir.exists()
    if is_main_process:
        source = config.data_dir or "tfds's default data directory"
        products = _lower_precision_products(config.model.nmf.precision) + _nmf_iterations(spec)
        print(
            f"Training {config.model.architecture} into {workdir} ({config.dataset} from {source}{products}).",
            flush=True,
        )
    try:
        with _StopSignals() as signals, _workdir_lock(workdir, is_main_process):
            if start_over and is_main_process:
                workdirs.start_over(workdir)
            workdirs.check_same_run(workdir, config)
            trainer = Trainer(config, spec, parallel.data_mesh())
            # The checkpoints of a run in the workdir are checked before the data are read (damaged ones are
            # set aside); a new run writes nothing before its data are read.
            manager = None
            if workdirs.holds_run(workdir):
                manager = checkpoints.checkpoint_manager(workdir, config.checkpoints_to_keep)
            try:
                state, completed = trainer.initial_state, 0
                if manager is not None:
                    state, completed = checkpoints.resume(manager, workdir, state, config.seed, is_main_process)
                row = {}
                if completed < config.num_epochs:
                    splits = _read_splits(config)
                    if is_main_process:
                        workdirs.write_config(workdir, config)
                    if manager is None:
                        manager = checkpoints.checkpoint_manager(workdir, config.checkpoints_to_keep)
                    stop = _StopCheck(signals, workdir, completed)
                    row = _train(config, workdir, trainer, manager, stop, is_main_process, splits, state)
                elif is_main_process:
                    print(
                        f"{workdir} is trained for {completed} epochs already (config.num_epochs={config.num_epochs})."
                    )
            except BaseException:
                # The run's own error is the one to report, not what finishing a failed save says again.
                if manager is not None:
                    with contextlib.suppress(Exception), quiet_failure():
                        manager.wait_until_finished()
                        manager.close()
                raise
            if manager is not None:
                manager.close()
    except BaseException:
        if new_workdir and is_main_process:
            with contextlib.suppress(OSError):
                workdir.rmdir()  # only if empty: the run stopped before writing anything
        raise
    if is_main_process:
        print(run_summary(workdir), flush=True)
    return row


def _lower_precision_products(precision: str) -> str:
    """For the header line: how the NMF products run where ``precision`` is not float32 (empty otherwise)."""
    if precision == "float32":
        return ""
    try:
        return f"; NMF products in {ops.describe_precision(precision, jax.default_backend())}"
    except ValueError as error:  # a bad NMFJAX_CPU_BFLOAT16
        raise ConfigError(f"{error} Unset it to follow the processor's features.") from None


def _nmf_iterations(spec: models.NetworkSpec) -> str:
    """For the header line, on a CPU: that the fused C++ kernel runs the NMF iterations, or why
    ``kernel="auto"`` does not take it (unavailable, or slower here: no AVX-512); empty for other
    kernels and platforms, and for precisions that ``"auto"`` leaves to XLA's loop: tf32, and
    bfloat16 without the bf16 units.
    """
    if not spec.uses_nmf or spec.nmf.kernel not in ("cpu", "auto") or jax.default_backend() != "cpu":
        return ""
    if spec.nmf.kernel == "auto" and spec.nmf.precision != "float32":
        applies = kernels.cpu_kernel_applies(spec.nmf.precision, jnp.float32, ops.cpu_bfloat16_path())
        return "; NMF iterations in the fused C++ kernel" if applies else ""
    reason = cpu_kernel.unavailable_reason()
    if reason is not None:  # (a compiler's error may run over many lines: its first says what failed)
        return f"; NMF iterations in XLA's loop: the C++ kernel is unavailable ({reason.splitlines()[0]})"
    if spec.nmf.kernel == "auto" and not kernels.cpu_kernel_applies("float32", jnp.float32, ops.cpu_bfloat16_path()):
        return "; NMF iterations in XLA's loop, faster than the C++ kernel on a processor without AVX-512"
    return "; NMF iterations in the fused C++ kernel"


def _read_splits(config: ml_collections.ConfigDict) -> tuple[data.Split, data.Split]:
    """The run's train and test splits, decoded; a train split smaller than a batch is a ConfigError."""
    read = dict(data_dir=config.data_dir, download=config.download, image_size=config.image_size)
    train = data.load_split(config.dataset, "train", limit=config.num_train_examples, **read)
    test = data.load_split(config.dataset, "test", **read)
    if len(train) < config.batch_size:
        raise ConfigError(
            f"the train split of {config.dataset!r} holds {len(train)} examples, fewer than config.batch_size="
            f"{config.batch_size}: an epoch would have no step. Lower config.batch_size, or use a larger dataset."
        )
    return train, test


# TensorBoard is not a dependency (tensorboardX writes its files without it): where its command is
# missing, the hint says how to get it.
TENSORBOARD_INSTALL = "after pip install 'nmfjax[tensorboard]'"


def run_summary(workdir: str | pathlib.Path) -> str:
    """What ``train.py`` prints at the end of a run: its best and last test accuracy with their epochs,
    the files it wrote, and the commands that look at it (TensorBoard's with how to install it, where
    its command is not on the PATH).
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
        (f"tensorboard --logdir {workdir}", "" if shutil.which("tensorboard") else TENSORBOARD_INSTALL),
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


class _StopCheck:
    """Raises :class:`~nmfjax.errors.TrainingInterrupted` after a stop signal, naming the last complete
    checkpoint; called after every step and test batch.
    """

    def __init__(self, signals: _StopSignals, workdir: pathlib.Path, completed: int):
        self.signals, self.workdir, self.completed = signals, workdir, completed

    def __call__(self) -> None:
        if self.signals.received is not None:
            completed, name = self.completed, signal.Signals(self.signals.received).name
            done = f"the checkpoint of epoch {completed} is complete" if completed else "no epoch was complete yet"
            raise TrainingInterrupted(
                f"interrupted by {name} during epoch {completed + 1}: {done} in {self.workdir / 'checkpoints'}; "
                "rerun the same command to resume.",
                self.signals.received,
            )


def _train(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    trainer: Trainer,
    manager: ocp.CheckpointManager,
    stop: _StopCheck,
    is_main_process: bool,
    splits: tuple[data.Split, data.Split],
    state: TrainState,
) -> dict[str, Any]:
    """Puts the data on the devices, compiles, and runs the epochs left; returns the last epoch's row."""
    stop()
    arrays = tuple(trainer.put_replicated(array) for split in splits for array in (split.images, split.labels))
    compile_seconds = trainer.compile(state, *arrays)
    if is_main_process:
        _announce(config, state, splits, compile_seconds)
    return _run_epochs(config, workdir, trainer, manager, stop, is_main_process, state, arrays, compile_seconds)


def _announce(
    config: ml_collections.ConfigDict, state: TrainState, splits: tuple[data.Split, data.Split], seconds: float
) -> None:
    parameters = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    train, test = splits
    print(
        f"{config.model.architecture}: {parameters:,} parameters, "
        f"{len(train)} train / {len(test)} test images, {jax.device_count()} device(s)"
        + (f" in {jax.process_count()} processes, " if jax.process_count() > 1 else ", ")
        + f"compiled in {seconds:.1f} s.",
        flush=True,
    )


def _run_epochs(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    trainer: Trainer,
    manager: ocp.CheckpointManager,
    stop: _StopCheck,
    is_main_process: bool,
    state: TrainState,
    arrays: tuple[jax.Array, ...],
    compile_seconds: float,
) -> dict[str, Any]:
    """The epochs from ``stop.completed + 1`` to ``config.num_epochs``, each saved and recorded."""
    train_images, train_labels, test_images, test_labels = arrays
    scalars = workdirs.ScalarLog(workdir / "tensorboard") if is_main_process else None
    row: dict[str, Any] = {}
    max_rate = max(config.learning_rates[group] for group in models.PARAMETER_GROUPS)
    try:
        for epoch in range(stop.completed + 1, config.num_epochs + 1):
            stop()
            if max_rate * float(state.plateau.scale) < config.min_learning_rate:
                print(f"Every learning rate is below {config.min_learning_rate}: stopping.")
                break
            epoch_start = time.perf_counter()
            rates = learning_rates(config, state)
            state, train_metrics = trainer.train_epoch(state, epoch, train_images, train_labels, is_main_process, stop)
            if not math.isfinite(train_metrics["train_loss"]):
                raise TrainingDiverged(
                    f"epoch {epoch}: the training loss is {train_metrics['train_loss']}; nothing of this epoch was "
                    f"saved (the latest checkpoint in {workdir / 'checkpoints'} is still finite). Lower "
                    "config.learning_rates, or use config.model.nmf.gradient='approx', and rerun to resume."
                )
            test_metrics = trainer.evaluate(state, test_images, test_labels, stop)
            state = trainer.update_plateau(state, {**train_metrics, **test_metrics}[config.plateau.metric])
            row = {
                "epoch": epoch,
                **train_metrics,
                **test_metrics,
                **{f"learning_rate_{group}": rate for group, rate in rates.items()},
                # The plateau rule's verdict on this epoch: the scale of every rate in the next one.
                "next_learning_rate_scale": float(state.plateau.scale),
                "compile_seconds": compile_seconds,
                "epoch_seconds": time.perf_counter() - epoch_start,
            }
            checkpoints.save(manager, epoch, stop.completed, state, config.seed, row)
            stop.completed = epoch
            if is_main_process:
                assert scalars is not None
                workdirs.record_epoch(workdir, row, scalars)
                print(epoch_line(row, config.num_epochs), flush=True)
    finally:
        if scalars is not None:
            scalars.close()
    return row
