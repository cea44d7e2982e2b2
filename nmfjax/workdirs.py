"""A training run's directory: the run that uses it, its config, its metrics and its TensorBoard
events, kept consistent through crashes and reruns (the checkpoints are :mod:`nmfjax.checkpoints`').

``WORKDIR/lock`` (the run that uses the workdir now: host, pid, start time),
``config.json`` (checked against a rerun's config), ``metrics.jsonl`` (one row
per epoch, cut back to the checkpoint a run resumes from), ``tensorboard/``,
and ``checkpoints/`` and ``damaged_checkpoints/`` (:mod:`nmfjax.checkpoints`).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import json
import math
import os
import pathlib
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from nmfjax.configuration import RESUMABLE_FIELDS
from nmfjax.errors import MissingFileError, WorkdirError, close_directory_hint, describe
from nmfjax.outputs import storage_errors, write_atomically

#: The rate of the first parameter group (nmfjax.models.PARAMETER_GROUPS) in a metrics row.
_FIRST_RATE = "learning_rate_module_a"

# --- the run's config.json: older layouts read as today's, and compared with a rerun's ---

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
    "model.nmf.kernel": "xla",  # (before the fused kernel, XLA ran every NMF op)
    "model.nmf.unroll": False,  # (XLA's while loop)
    "steps_per_call": None,  # (one step per call: what None gives on a CPU)
    "image_size": None,  # (the images as stored)
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
    """The fields, other than :data:`~nmfjax.configuration.RESUMABLE_FIELDS`, in which ``config`` differs
    from a saved one.

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
        if not _is_resumable(name) and old.get(name, absent) != new.get(name, absent)
    ]


def _is_resumable(name: str) -> bool:
    return any(name == field or name.startswith(field + ".") for field in RESUMABLE_FIELDS)


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its ``config.json``, converted to today's layout)."""
    path = pathlib.Path(workdir) / "config.json"
    check_exists(workdir)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist: is {workdir} a workdir written by train.py?")
    try:
        return ml_collections.ConfigDict(upgrade_config(json.loads(path.read_text())))
    except ValueError as error:
        raise WorkdirError(f"{path} cannot be read ({describe(error)}).") from None


# --- the run directory ---


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


def holds_run(workdir: pathlib.Path) -> bool:
    """Whether ``workdir`` holds (part of) a run: its config, metrics or checkpoints."""
    return any((workdir / name).exists() for name in ("config.json", "metrics.jsonl", "checkpoints"))


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


def write_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Writes the run's ``config.json`` (atomically; a full disk is one line)."""
    with storage_errors(workdir / "config.json", "Free space, or train into another --workdir."):
        write_atomically(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")


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


def check_exists(workdir: str | pathlib.Path) -> None:
    """A workdir named on a command line exists, or the command ends naming the typo's likely fix.

    Raises:
      MissingFileError: ``workdir`` is not a directory.
    """
    if not pathlib.Path(workdir).is_dir():
        raise MissingFileError(
            f"{workdir} does not exist{close_directory_hint(workdir)}: name a workdir that train.py wrote."
        )


def trained_epochs(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """:func:`read_metrics` of a workdir that must hold at least one epoch.

    Raises:
      MissingFileError: ``workdir`` does not exist, or holds no epoch yet.
    """
    check_exists(workdir)
    rows = read_metrics(workdir)
    if not rows:
        raise MissingFileError(f"{pathlib.Path(workdir) / 'metrics.jsonl'} holds no epochs: train with train.py first.")
    return rows


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


def rate_drops(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """The epochs after which the plateau rule divided the learning rates (arXiv 2503.20398, section 2.6).

    Args:
      rows: a run's :func:`read_metrics`, from its first epoch.

    Returns:
      Each epoch whose rule's verdict, the row's ``next_learning_rate_scale`` (rows since 0.4), is below the
      scale the epoch ran at; in rows without it, each epoch followed by one at a lower rate. The scales
      are module a's rate over the first epoch's (every group's rate is scaled alike).
    """
    if not rows:
        return []
    start = rows[0][_FIRST_RATE]
    drops = []
    for index, row in enumerate(rows):
        if "next_learning_rate_scale" in row:
            next_rate = row["next_learning_rate_scale"] * start
        elif index + 1 < len(rows):
            next_rate = rows[index + 1][_FIRST_RATE]
        else:
            continue
        # A relative margin: the recorded rate and the verdict are float32 scales times the rate in float64.
        if next_rate < row[_FIRST_RATE] * (1 - 1e-6):
            drops.append(row["epoch"])
    return drops


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


def record_epoch(workdir: pathlib.Path, row: Mapping[str, Any], scalars: ScalarLog) -> None:
    """Appends a saved epoch's row to ``metrics.jsonl`` and TensorBoard; a full disk is one line that
    says the checkpoint holds the row, which the rerun restores.
    """
    epoch = row["epoch"]
    remedy = (
        f"The checkpoint of epoch {epoch} is complete and holds the epoch's metrics: free space and rerun "
        f"the same command, which resumes after epoch {epoch} and writes its row to metrics.jsonl."
    )
    with storage_errors(workdir / "metrics.jsonl", remedy):
        append_metrics(workdir, row)
    with storage_errors(scalars.directory, f"{remedy} (TensorBoard will lack epoch {epoch}.)"):
        scalars.add(row, epoch)
