"""Files that commands write: atomically, and with a full disk or a read-only place reported in one line.

The run directory (:mod:`nmfjax.workdirs`), the analyses, the figures and the
benchmark write through these, so that a crash or a full disk leaves the old
file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator

from nmfjax.errors import StorageError, describe, storage_problem


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
