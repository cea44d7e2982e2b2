"""Markdown tables of result rows, as the benchmark and the comparison of runs print them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

#: A column is its title, the row's key (or a function of the row), and the format of the value.
Column = tuple[str, str | Callable[[Mapping[str, Any]], Any], str]


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """One line per row under a header of the columns' titles, e.g.
    ``markdown_table(rows, [("model", "model", "s"), ("train img/s", "train_images_per_second", ".0f")])``.
    """
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(key(row) if callable(key) else row[key], fmt) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
