"""Errors a user can fix, and the interruption of a training run.

The commands (``train.py``, ``python -m nmfjax.experiments``, ``nmfjax.plots``,
``nmfjax.bench``) print a :class:`UserError` as one line, ``error: ...``, and
exit with status 2; anything else is a bug and keeps its traceback. Each
subclass also derives from the built-in exception a library caller would
expect (``ValueError`` for a bad value, ``FileNotFoundError`` for a missing
file), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import signal


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
