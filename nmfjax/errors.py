"""Errors a user can fix, and the interruption of a training run.

The commands (``train.py``, ``python -m nmfjax.experiments``, ``nmfjax.plots``,
``nmfjax.bench``) print a :class:`UserError` as one line, ``error: ...``, and
exit with status 2; anything else is a bug and keeps its traceback. Each
subclass also derives from the built-in exception a library caller would
expect (``ValueError`` for a bad value, ``FileNotFoundError`` for a missing
file), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import gc
import logging
import os
import pathlib
import re
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator


class UserError(Exception):
    """A mistake the user can fix: the message names the bad value and the remedy, on one line."""


class ConfigError(UserError, ValueError):
    """A config field or command-line value that is wrong."""


class MissingFileError(UserError, FileNotFoundError):
    """A config file, workdir or checkpoint that does not exist."""


class DatasetUnavailableError(UserError, RuntimeError):
    """The dataset is not in the data directory and could not be prepared there."""


class TrainingDiverged(UserError, FloatingPointError):
    """The training loss became NaN or infinite; nothing of that epoch was saved."""


class WorkdirError(UserError):
    """A workdir that does not fit the run: another config, or no checkpoint that can be restored."""


class StorageError(UserError, OSError):
    """A file could not be written because of where it goes: a full disk, a read-only file system."""


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from, outermost first."""
    seen = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


# The failed writes that the storage causes, not the program: what each one means for the user.
_STORAGE_PROBLEMS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would exceed the size limit for files",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission is denied",
    errno.EPERM: "the operation is not permitted",
}
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how TensorStore (orbax's writer) names the errno


def storage_problem(error: BaseException) -> str | None:
    """What a failed write says about its storage (``"the disk is full"``, ...), or None when the
    failure is not the storage's. Reads ``OSError.errno`` and the errno TensorStore puts in its messages.
    """
    for cause in causes(error):
        code = cause.errno if isinstance(cause, OSError) else None
        match = _OS_ERROR_CODE.search(str(cause))
        code = code if code in _STORAGE_PROBLEMS else int(match.group(1)) if match else None
        if code in _STORAGE_PROBLEMS:
            return _STORAGE_PROBLEMS[code]
    return None


def close_directory_hint(path: str | pathlib.Path) -> str:
    """`` (did you mean PARENT/NAME?)`` for a directory beside a missing ``path`` whose name is close
    to its name (a typo), else ``""``.
    """
    path = pathlib.Path(path).expanduser()
    parent = path.parent
    if not parent.is_dir():
        return ""
    siblings = [child.name for child in parent.iterdir() if child.is_dir()]
    close = difflib.get_close_matches(path.name, siblings, n=1)
    return f" (did you mean {parent / close[0]}?)" if close else ""


def describe(error: BaseException) -> str:
    """``Type: first line of the message``, short enough for a one-line error."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; the latest complete checkpoint is intact.

    Attributes:
      signal_number: the signal received; ``train.py`` exits with ``128 + signal_number``.
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number

    @property
    def signal_name(self) -> str:
        """``SIGINT`` or ``SIGTERM``."""
        return signal.Signals(self.signal_number).name


def _drop_unretrieved_task_errors(record: logging.LogRecord) -> bool:
    """False for asyncio's "... exception was never retrieved" reports (a reported failure's tasks)."""
    return "exception was never retrieved" not in record.getMessage()


@contextlib.contextmanager
def quiet_failure(is_reported: Callable[[BaseException], bool] = lambda error: True) -> Iterator[None]:
    """Keeps what orbax and TensorStore print about a failure they raise off the terminal.

    When a restore or a save fails, their threads log the error with tracebacks and, for a
    moment after the exception, report dozens of "Event loop is closed" errors, to file
    descriptor 2 and to ``sys.unraisablehook``. Both go to a sink while the block runs. If it
    ends normally, or with an error ``is_reported`` rejects (it will not become one line),
    what was held is written to stderr after all; if it ends with an error that is reported,
    the sink is dropped once it has stopped growing (at most a few seconds), and asyncio's
    reports of the failed writes' tasks, which come whenever those are garbage collected (often
    while the program exits, after the sink is gone), are dropped from then on.
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
                logging.getLogger("asyncio").addFilter(_drop_unretrieved_task_errors)
                # Wait until the threads are quiet (the sink stops growing), and collect the failed
                # tasks, whose "exception was never retrieved" reports go to the sink too.
                size, deadline = -1, time.monotonic() + 5
                while os.fstat(sink.fileno()).st_size != size and time.monotonic() < deadline:
                    size = os.fstat(sink.fileno()).st_size
                    time.sleep(0.2)
                    with warnings.catch_warnings():  # the failed restore's abandoned coroutines are collected too
                        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
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
