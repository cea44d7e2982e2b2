"""A run's checkpoints and trained networks: orbax checkpoints of a workdir (saved every epoch,
restored from the newest intact one, damaged ones set aside) and exported networks (the weights
alone, which :func:`load_checkpoint` and every analysis read like a workdir).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import shutil
import sys
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nmfjax import configuration, models, parallel, workdirs
from nmfjax.errors import (
    ConfigError,
    MissingFileError,
    StorageError,
    WorkdirError,
    describe,
    quiet_failure,
    storage_problem,
)
from nmfjax.outputs import write_output
from nmfjax.trainer import TrainState, initial_state

DAMAGED_CHECKPOINTS = "damaged_checkpoints"  # where checkpoints that cannot be restored are moved
_COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, on every file system


def _test_accuracy(metrics: Mapping[str, Any]) -> float:
    return metrics["test_accuracy"]


def checkpoint_manager(workdir: pathlib.Path, checkpoints_to_keep: int) -> ocp.CheckpointManager:
    """Orbax checkpoints of ``workdir``: the latest ``checkpoints_to_keep`` and the best by test accuracy.

    Each checkpoint stores its epoch's metrics row next to the state (``best_fn``
    makes orbax write it to disk): the best one is still known after a restart,
    and a row lost in a crash can be recovered.
    """
    policies = ocp.checkpoint_managers.preservation_policy
    keep = policies.AnyPreservationPolicy(
        [
            policies.LatestN(n=checkpoints_to_keep),
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


def _unfinished(step_directory: pathlib.Path) -> str | None:
    """Why a checkpoint directory is certainly incomplete, or None."""
    if not any(step_directory.iterdir()):
        return "its directory is empty"
    if not (step_directory / _COMMIT_MARKER).exists():
        return f"it has no commit marker ({_COMMIT_MARKER}): its save, or a copy of it, did not finish"
    return None


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


def restore_newest(
    manager: ocp.CheckpointManager, workdir: pathlib.Path, args: ocp.args.CheckpointArgs, move: bool
) -> tuple[Any | None, list[pathlib.Path]]:
    """Restores the newest checkpoint that can be restored.

    A checkpoint that cannot (an empty or unfinished step directory, a missing
    or truncated file) is reported in one line and moved to
    ``WORKDIR/damaged_checkpoints/`` (by the process whose ``move`` is true), and the
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
                with quiet_failure():
                    restored = manager.restore(step, args=args)
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


@contextlib.contextmanager
def saving_checkpoint(manager: ocp.CheckpointManager, epoch: int, completed: int, state: Any) -> Iterator[None]:
    """Around the save of epoch ``epoch``'s checkpoint (``completed``: the last one saved): a save
    the storage makes fail (a full disk, ...) is a :class:`~nmfjax.errors.StorageError` saying
    what it needed, with the partial checkpoint removed and nothing else touched.
    """
    try:
        with quiet_failure(lambda error: storage_problem(error) is not None):
            yield
    except Exception as error:
        problem = storage_problem(error)
        if problem is None:
            raise
        directory = pathlib.Path(manager.directory)
        for partial in directory.glob(f"{epoch}.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
        needed = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state)) / 1e6
        free = shutil.disk_usage(directory).free / 1e6
        kept = f"the checkpoint of epoch {completed}" if completed else "no earlier checkpoint"
        resume = f"resumes after epoch {completed}" if completed else "starts from the first epoch"
        raise StorageError(
            f"saving the checkpoint of epoch {epoch} in {directory} failed: {problem} (it needs about "
            f"{needed:.1f} MB; {free:.1f} MB are free now). Nothing is lost: {kept} and metrics.jsonl are as they "
            f"were. Free space (or move the workdir elsewhere) and rerun the same command: it {resume}."
        ) from None


def checkpoint_row(manager: ocp.CheckpointManager, epoch: int) -> Mapping[str, Any] | None:
    """The metrics row saved with a checkpoint (None for epoch 0 or when it cannot be read)."""
    if not epoch:
        return None
    try:
        return manager.metrics(epoch)
    except Exception:  # a damaged metadata file only costs the row's recovery
        return None


def resume(
    manager: ocp.CheckpointManager, workdir: pathlib.Path, template: TrainState, seed: int, is_main_process: bool
) -> tuple[TrainState, int]:
    """The state a run continues from and the epochs it has completed: the newest checkpoint that can be
    restored (damaged ones set aside by process 0), or ``template`` and 0 for a new run; ``metrics.jsonl``
    is cut back to it.

    Raises:
      WorkdirError: no checkpoint can be restored but ``metrics.jsonl`` records epochs after the first.
    """
    restored, set_aside = restore_newest(manager, workdir, _restore_args(template, seed), is_main_process)
    state, completed = template, 0
    if restored is not None:
        state, completed = restored["state"], int(restored["epoch"])
    recorded = max((row["epoch"] for row in workdirs.read_metrics(workdir)), default=0)
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
        workdirs.cut_metrics_at(workdir, completed, checkpoint_row(manager, completed))
        if completed:
            print(f"Resumed from {workdir / 'checkpoints'} after epoch {completed}.", flush=True)
    return state, completed


def save(
    manager: ocp.CheckpointManager, epoch: int, completed: int, state: TrainState, seed: int, row: Mapping[str, Any]
) -> None:
    """Saves epoch ``epoch``'s checkpoint with its metrics row, and waits for it: a write that fails is
    reported now, for this epoch (``completed``: the last epoch saved before).
    """
    # The row goes into the checkpoint too, so that a crash between it and metrics.jsonl loses nothing.
    with saving_checkpoint(manager, epoch, completed, state):
        manager.save(epoch, args=ocp.args.StandardSave({"state": state, "epoch": epoch, "seed": seed}), metrics=row)
        manager.wait_until_finished()


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _restore_args(state: TrainState, seed: int) -> ocp.args.StandardRestore:
    return ocp.args.StandardRestore(_abstract({"state": state, "epoch": 0, "seed": seed}))


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
      workdir: a directory written by :func:`nmfjax.training.train_and_evaluate`.
      output: the directory to write (created; its three files are replaced).
      step: the checkpoint, as for :func:`load_checkpoint`.

    Returns:
      The path of the weights file.
    """
    workdir, output = pathlib.Path(workdir), pathlib.Path(output)
    config, _, state, epoch = load_checkpoint(workdir, step)
    config.data_dir = None  # a path on the machine that trained it; elsewhere tfds's default directory
    write_output(output / "config.json", config.to_json_best_effort(indent=2) + "\n")
    write_output(output / "metrics.jsonl", (workdir / "metrics.jsonl").read_text())
    weights = io.BytesIO()
    arrays: dict[str, Any] = {"epoch": np.int32(epoch), **_flat_arrays(state)}
    np.savez(weights, **arrays)
    return write_output(output / EXPORTED_WEIGHTS, weights.getvalue())


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
      workdir: a directory written by :func:`nmfjax.training.train_and_evaluate`, or by
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
    config = workdirs.load_config(workdir)
    if batch_norm_statistics is not None:
        config.model.batch_norm_statistics = batch_norm_statistics
    spec = configuration.network_spec(config)
    # A template of the state (shapes, structure), as a new run starts it; no train step is built.
    model = models.build(spec, config.seed)
    template = initial_state(config, model, parallel.data_mesh())
    if is_exported_network(workdir):
        state, epoch = _load_exported(workdir, step, template)
    else:
        state, epoch = _restore_checkpoint(workdir, config, step, template)
    graphdef, _, _ = models.split_state(model)
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    model.eval()
    return config, model, state, epoch


def _restore_checkpoint(
    workdir: pathlib.Path, config: ml_collections.ConfigDict, step: int | str | None, initial: TrainState
) -> tuple[TrainState, int]:
    manager = checkpoint_manager(workdir, config.checkpoints_to_keep)
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
            with quiet_failure():
                restored = manager.restore(epoch, args=_restore_args(initial, 0))
        except Exception as error:  # orbax and tensorstore raise many types for unreadable data
            raise WorkdirError(
                f"the checkpoint of epoch {epoch} in {workdir / 'checkpoints'} cannot be restored ({describe(error)}); "
                "pick another with --step, or rerun train.py on the workdir, which moves damaged checkpoints aside."
            ) from None
    finally:
        manager.close()
    return restored["state"], int(epoch)
