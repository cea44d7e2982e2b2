"""The one check for counts (iterations, features, batch sizes, ...) that every module uses."""

from __future__ import annotations

import numbers


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is a Python or NumPy integer >= 1 (``True`` is not an int here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1


def check_positive_int(name: str, value: object) -> None:
    """Raises ``TypeError`` (not an integer) or ``ValueError`` (< 1) naming ``name`` and ``value``."""
    if not is_positive_int(value):
        error = ValueError if isinstance(value, numbers.Integral) and not isinstance(value, bool) else TypeError
        raise error(f"{name} must be a positive int, got {value!r}.")
