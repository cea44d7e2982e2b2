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
import math
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from nmfjax.configuration import RESUMABLE_FIELDS, config_differences
from nmfjax.errors import StorageError, WorkdirError, describe, storage_problem

DAMAGED_CHECKPOINTS = "damaged_checkpoints"  # where checkpoints that cannot be restored are moved
_COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, on every file system


@contextlib.contextmanager
def storage_errors(path: str | pathlib.Path, remedy: str) -> Iterator[None]:
    """Reports a write to ``path`` that failed because of its storage (a full disk, a read-only
    file system, no permission) as a :class:`~nmfjax.errors.StorageError` naming the path, the
    problem and ``remedy``; other errors pass unchanged.
    """
    try:
        yield
    except Exception as error:
        problem = storage_problem(error)
        if problem is None:
            raise
        raise StorageError(f"writing {path} failed: {problem} ({describe(error)}). {remedy}") from None


def write_atomically(path: pathlib.Path, content: str | bytes) -> None:
    """Replaces ``path`` in one rename, so a crash or a full disk leaves the old or the new file,
    never half of one (the partial file is removed).
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(content.encode() if isinstance(content, str) else content)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_output(path: str | pathlib.Path, content: str | bytes) -> pathlib.Path:
    """Writes a command's output file atomically (creating its folder); a full disk or a read-only
    place is a :class:`~nmfjax.errors.StorageError`. Returns the path.
    """
    path = pathlib.Path(path)
    with storage_errors(path, "Free space or choose another --output, and run the command again."):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, content)
    return path


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
    path = workdir / LOCK
    remedy = "Train into a directory that is writable and has room (--workdir)."
    while True:
        with storage_errors(path, remedy):
            workdir.mkdir(parents=True, exist_ok=True)
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
        with storage_errors(path, remedy):
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
def quiet_failure(is_reported: Callable[[BaseException], bool] = lambda error: True) -> Iterator[None]:
    """Keeps what orbax and TensorStore print about a failure they raise off the terminal.

    When a restore or a save fails, their threads log the error with tracebacks and, for a
    moment after the exception, report dozens of "Event loop is closed" errors, to file
    descriptor 2 and to ``sys.unraisablehook``. Both go to a sink while the block runs. If it
    ends normally, or with an error ``is_reported`` rejects (it will not become one line),
    what was held is written to stderr after all; if it ends with an error that is reported,
    the sink is dropped once it has stopped growing (at most a few seconds).
    """
    sys.stderr.flush()
    saved_descriptor, saved_hook = os.dup(2), sys.unraisablehook
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        sys.unraisablehook = lambda unraisable: None
        held_back = True
        try:
            yield
        except Exception as error:
            held_back = is_reported(error)
            if held_back:
                # Wait until the threads are quiet (the sink stops growing), and collect the failed
                # tasks, whose "exception was never retrieved" reports go to the sink too.
                size, deadline = -1, time.monotonic() + 5
                while os.fstat(sink.fileno()).st_size != size and time.monotonic() < deadline:
                    size = os.fstat(sink.fileno()).st_size
                    time.sleep(0.2)
                    gc.collect()
            raise
        else:
            held_back = False
        finally:
            sys.stderr.flush()
            sys.unraisablehook = saved_hook
            os.dup2(saved_descriptor, 2)
            os.close(saved_descriptor)
            if not held_back:
                sink.seek(0)
                os.write(2, sink.read())


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


class ScalarLog:
    """A run's TensorBoard scalars in ``directory`` (tensorboardX's event files, no TensorFlow).

    Each epoch's row is written and flushed before :meth:`add` returns, in the
    calling thread: a full disk raises here, instead of killing the writer thread
    of ``tensorboardX.SummaryWriter``, which then blocks the run.
    """

    def __init__(self, directory: pathlib.Path):
        from tensorboardX.event_file_writer import EventsWriter

        self.directory = directory
        with storage_errors(directory, "Free space, or train into another --workdir."):
            directory.mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(str(directory / "events"))

    def add(self, row: Mapping[str, Any], step: int) -> None:
        """One event with every finite float of ``row`` (but ``epoch``) as a scalar at ``step``."""
        from tensorboardX import summary
        from tensorboardX.proto import event_pb2

        values = [
            value
            for name, number in row.items()
            if name != "epoch" and isinstance(number, float) and math.isfinite(number)
            for value in summary.scalar(name, number).value
        ]
        event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary.Summary(value=values))
        self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        """Closes the event file (errors closing it are not the run's: its events are flushed)."""
        with contextlib.suppress(OSError):
            self._writer.close()


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
