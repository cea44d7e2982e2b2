"""A training run's directory: its config, its checkpoints and its metrics, kept
consistent through crashes, damage and reruns.

``WORKDIR/config.json`` (checked against a rerun's config), ``checkpoints/``
(orbax; each one also holds its epoch's metrics row), ``metrics.jsonl`` (one
row per epoch, cut back to the checkpoint a run resumes from) and
``damaged_checkpoints/`` (checkpoints that could not be restored, kept) and
``lock`` (the run that uses the workdir now: host, pid, start time).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import gc
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from nmfjax.configuration import RESUMABLE_FIELDS, config_differences
from nmfjax.errors import WorkdirError, describe

DAMAGED_CHECKPOINTS = "damaged_checkpoints"  # where checkpoints that cannot be restored are moved
_COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, on every file system


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Replaces ``path`` in one rename, so a crash leaves the old or the new file, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _replaced_name(workdir: pathlib.Path) -> pathlib.Path:
    return workdir.with_name(f"{workdir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")


LOCK = "lock"


def _check_is_directory(workdir: pathlib.Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"the workdir {workdir} is a file; give a directory (--workdir).")


@contextlib.contextmanager
def locked(workdir: pathlib.Path) -> Iterator[None]:
    """Holds ``WORKDIR/lock`` while a run uses the workdir (in a distributed run, process 0 holds
    it for all processes).

    The lock is an ``flock`` on the file, which the system releases when its holder
    dies, so a lock left by a crash or ``kill -9`` is taken over. The file names the
    holder (host, pid, start time) for the error another run gets. Where the file
    names another host and that run's lock is not visible here (a file system
    without shared locks), the run stops rather than guess.

    Raises:
      WorkdirError: another run holds the workdir, naming it and the remedies.
    """
    _check_is_directory(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(path)
            os.close(descriptor)
            raise WorkdirError(
                f"{workdir} is in use by another run ({_describe_holder(holder)}). Wait for it to end, or train "
                "into another workdir (--workdir). Processes of one distributed run share it: start them with "
                "--config.distributed.enabled=True."
            ) from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(descriptor).st_ino:
            break  # (else the previous holder removed the file between our open and our flock: retry)
        os.close(descriptor)
    try:
        previous = _read_lock(path)
        host = socket.gethostname()
        if previous and previous.get("host") != host:
            raise WorkdirError(
                f"{path} names a run on another host ({_describe_holder(previous)}), which may still be running. "
                f"If it has ended, delete {path}; or train into another workdir (--workdir)."
            )
        if previous:
            print(
                f"Taking over {path} from a run that ended without releasing it ({_describe_holder(previous)}).",
                flush=True,
            )
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps({"host": host, "pid": os.getpid(), "started": started}).encode())
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(descriptor)


def _read_lock(path: pathlib.Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe_holder(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "its lock file names no holder yet"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def start_over(workdir: pathlib.Path) -> None:
    """Moves a previous run in ``workdir`` aside (all but the lock), so that the new one starts from scratch."""
    previous = [entry for entry in workdir.iterdir() if entry.name != LOCK] if workdir.is_dir() else []
    if previous:
        aside = _replaced_name(workdir)
        aside.mkdir()
        for entry in previous:
            entry.rename(aside / entry.name)
        print(f"Moved the previous run in {workdir} to {aside}; starting from scratch.", flush=True)


def check_same_run(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Raises :class:`~nmfjax.errors.WorkdirError` unless ``workdir`` is new or holds a run of the same config."""
    remedy = (
        f"Train into another workdir (--workdir), or pass --start_over to move this run aside "
        f"(to {_replaced_name(workdir).name}) and start again"
    )
    _check_is_directory(workdir)
    path = workdir / "config.json"
    if not path.exists():
        if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
            raise WorkdirError(f"{workdir} holds checkpoints but no config.json to check them against. {remedy}.")
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise WorkdirError(f"{path} cannot be read ({describe(error)}). {remedy}.") from None
    differences = config_differences(saved, config)
    if differences:
        listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in differences)
        raise WorkdirError(
            f"{workdir} holds a run with another config ({listed}). {remedy}. "
            f"A rerun may change only {', '.join(RESUMABLE_FIELDS)}."
        )


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


@contextlib.contextmanager
def quiet_restore() -> Iterator[None]:
    """Silences what a failed restore leaves behind: tensorstore's reader threads report dozens of
    "Event loop is closed" errors, to file descriptor 2 and to ``sys.unraisablehook``, for a moment after
    the exception. Both go to a sink while a checkpoint is tried; the exception itself is reported.
    """
    sys.stderr.flush()
    saved_descriptor, saved_hook = os.dup(2), sys.unraisablehook
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        sys.unraisablehook = lambda unraisable: None
        try:
            yield
        except Exception:
            # Wait until the reader threads are quiet (the sink stops growing), at most a few seconds, and
            # collect the failed read tasks, whose "exception was never retrieved" reports go to the sink too.
            size, deadline = -1, time.monotonic() + 5
            while os.fstat(sink.fileno()).st_size != size and time.monotonic() < deadline:
                size = os.fstat(sink.fileno()).st_size
                time.sleep(0.2)
                gc.collect()
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
                with quiet_restore():
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


def append_metrics(workdir: pathlib.Path, row: Mapping[str, Any]) -> None:
    """Adds an epoch's row to ``metrics.jsonl``."""
    with open(workdir / "metrics.jsonl", "a") as metrics_file:
        metrics_file.write(json.dumps(row) + "\n")


def cut_metrics_at(workdir: pathlib.Path, epoch: int, checkpoint_row: Mapping[str, Any] | None) -> None:
    """Makes ``metrics.jsonl`` end at the checkpoint a run resumes from: drops later rows, and adds
    the checkpoint's own row if a crash came between saving it and writing the file.
    """
    rows = [row for row in read_metrics(workdir) if row["epoch"] <= epoch]
    if epoch and (not rows or rows[-1]["epoch"] < epoch) and checkpoint_row and "epoch" in checkpoint_row:
        rows.append(dict(checkpoint_row))
    write_atomically(workdir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


def checkpoint_row(manager: ocp.CheckpointManager, epoch: int) -> Mapping[str, Any] | None:
    """The metrics row saved with a checkpoint (None for epoch 0 or when it cannot be read)."""
    if not epoch:
        return None
    try:
        return manager.metrics(epoch)
    except Exception:  # a damaged metadata file only costs the row's recovery
        return None
