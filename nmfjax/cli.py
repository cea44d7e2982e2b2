"""Command-line plumbing shared by ``train.py`` and the package's commands.

A user's mistake ends a command with one line, ``error: ...``, and exit
status 2 (:func:`fail`, :func:`exit_on_errors`); an interrupted training run
with one line and ``128 + signal``. Config overrides given as ``FIELD=VALUE``
are parsed exactly as ``train.py``'s ``--config.FIELD=VALUE`` (:func:`override_config`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags

from nmfjax.errors import TrainingInterrupted, UserError
from nmfjax.validation import is_positive_int

USER_ERROR_STATUS = 2


def fail(message: str) -> NoReturn:
    """Ends the command: ``error: message`` on stderr, exit status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)


@contextlib.contextmanager
def exit_on_errors() -> Iterator[None]:
    """Turns a :class:`~nmfjax.errors.UserError` into :func:`fail`, and an interruption
    (:class:`~nmfjax.errors.TrainingInterrupted`, Ctrl-C) into one line and status ``128 + signal``.
    """
    try:
        yield
    except UserError as error:
        fail(str(error))
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        sys.exit(128 + stop.signal_number)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)


def package_help(module_name: str) -> str | None:
    """The help text of a package's command line (``module_name``: its ``cli`` module's ``__name__``):
    the package's docstring, read from the loaded package rather than imported (no import circle).
    """
    return sys.modules[module_name.rpartition(".")[0]].__doc__


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line, ``error: ...``, with exit status 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D102 (argparse's hook for a bad command line)
        fail(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """An ``argparse`` type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not is_positive_int(value):
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def flag_error_message(error: Exception, argv: Sequence[str]) -> str:
    """A one-line message for what absl and ml_collections raise on a bad ``--config.FIELD=VALUE``."""
    if isinstance(error, (AttributeError, KeyError)):
        # ml_collections reports an unknown field as a KeyError holding "'field'\nDid you mean ...".
        detail = error
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]
        text = str(detail)
        missing = text.split("'")[1] if text.count("'") >= 2 else text
        flag = next((arg.split("=")[0] for arg in argv if arg.split("=")[0].endswith(f".{missing}")), missing)
        hint = " ".join(text.split("Did you mean", 1)[1].split()) if "Did you mean" in text else ""
        return f"{flag}: the config has no field {missing!r}" + (f"; did you mean {hint}" if hint else "")
    return str(error)


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """``flag_values(argv)`` with every flag and config-override mistake reported by :func:`fail`."""
    try:
        return flag_values(list(argv))
    except (flags.Error, AttributeError, KeyError) as error:
        fail(flag_error_message(error, argv))


def override_config(config: ml_collections.ConfigDict, assignments: Sequence[str]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``FIELD=VALUE`` overrides parsed as ``train.py --config.FIELD=VALUE``.

    Values are typed by the field they replace (``download=false`` is the bool
    ``False``; ``num_epochs=abc`` is an error), unknown fields are errors.
    Mistakes end the command through :func:`fail`.

    Args:
      config: the config to start from (not modified).
      assignments: e.g. ``["nmf.iterations=5", "data_dir=../shared/tfds"]``.
    """
    argv = ["overrides"]
    for assignment in assignments:
        field, separator, _ = assignment.partition("=")
        if not separator or not field:
            fail(f"expected FIELD=VALUE (e.g. num_epochs=2), got {assignment!r}.")
        argv.append(f"--config.{assignment}")
    flag_values = flags.FlagValues()
    try:
        # A deep copy keeps the type of placeholder fields (data_dir: str or None).
        holder = config_flags.DEFINE_config_dict(
            "config", copy.deepcopy(config), flag_values=flag_values, sys_argv=argv
        )
        flag_values(argv)
    except (flags.Error, AttributeError, KeyError) as error:  # unknown fields surface while the flag is defined
        fail(flag_error_message(error, argv).replace("flag --config.", "--config."))
    return holder.value
