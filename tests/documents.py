"""Reading the numbers of a document (README.md, docs/) to check them against the records.

A :class:`Document` is the text with its whitespace collapsed (a sentence may
wrap). Checks say what it states (:meth:`Document.claim`, :meth:`Document.table`)
with the figures formatted from a committed record; what they confirm is
accounted for, as are the numbers the document takes from elsewhere
(:meth:`Document.given`: the paper, a dataset's definition, a setting).
:meth:`Document.unaccounted` lists every measured-looking number that no check
covered: a figure with a unit (``%``, ``s``, ``img/s``, ``MB``, ``x``, ...), a
decimal, a number with thousands separators, or one in scientific notation.
Code (fenced ``bash``/``python`` blocks, a notebook's ``{code-cell}``, and inline code) holds commands and
settings, not figures, and is not scanned; other fenced blocks (a command's
output) are.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterable

_UNIT = r"%|ms|us|s|min|minutes|h|hours|MB|GB|img/s|GFLOP/s|TFLOP/s|GFLOP|x"
_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?"
# A number not inside a word, a path or a version (1.2.3), with its unit if one follows.
_FIGURE = re.compile(rf"(?<![\w./#-])({_NUMBER})(?:[ -]?({_UNIT}))?(?![\w/]|\.\d)")
# References and versions: numbered things of the paper and of software, not figures.
_REFERENCE = re.compile(
    r"(?:section|sections|eq\.|eqs\.|Figure|arXiv:?|release|JAX|jax|flax|optax|Python|cifar10|nmfjax|CUDA|cuda)\s?$"
)


def _code_spans(text: str) -> list[tuple[int, int]]:
    """Spans of code: fenced bash/python blocks, and inline code outside fenced blocks."""
    spans, outside_fences = [], text
    front_matter = re.match(r"--- .*? ---", text)  # a notebook's YAML header (jupytext, kernel): settings
    if front_matter:
        spans.append(front_matter.span())
    for fence in re.finditer(r"```([\w{}-]*)(.*?)```", text):
        if fence.group(1) in ("bash", "python", "{code-cell}"):
            spans.append(fence.span())
        start, end = fence.span()
        outside_fences = outside_fences[:start] + " " * (end - start) + outside_fences[end:]
    spans.extend(code.span() for code in re.finditer(r"`[^`]+`", outside_fences))
    return spans


class Document:
    """A markdown document of the repository, to check its numbers against the records."""

    def __init__(self, path: pathlib.Path, name: str | None = None):
        self.path = path
        self.name = name or path.name
        self.text = " ".join(path.read_text().split())
        self._accounted: list[tuple[int, int]] = []
        self._code = _code_spans(self.text)

    def claim(self, template: str, *values: str) -> None:
        """The document says ``template`` with each ``{}`` replaced by a value (formatted by the
        caller from a record), everywhere it says it; those values are accounted for.
        """
        parts = " ".join(template.split()).split("{}")
        assert len(parts) == len(values) + 1, (template, values)
        values = tuple(" ".join(value.split()) for value in values)
        expected = "".join(part + value for part, value in zip(parts, [*values, ""], strict=True))
        starts = [match.start() for match in re.finditer(re.escape(expected), self.text)]
        assert starts, f"{self.name} does not say {expected!r}"
        for start in starts:
            for part, value in zip(parts, values, strict=False):
                start += len(part)
                self._accounted.append((start, start + len(value)))
                start += len(value)

    def table(self, markdown: str) -> None:
        """The document holds this table (rendered from a record), cell for cell."""
        self.claim("{}", " ".join(markdown.split()))

    def given(self, phrase: str, source: str) -> None:
        """The document says ``phrase``, whose numbers come from ``source`` (the paper, a dataset, a
        setting of the code that a test of its own pins), not from a measurement of ours.
        """
        assert source, "say where the numbers come from"
        self.claim("{}", " ".join(phrase.split()))

    def unaccounted(self) -> list[str]:
        """The measured-looking numbers outside code that no claim accounted for, each with its context."""
        found = []
        for match in _FIGURE.finditer(self.text):
            number, unit = match.groups()
            if not (unit or re.search(r"[.,e]", number)):
                continue  # a plain count (epochs, N, a batch size) is a setting, not a figure
            start, end = match.span(1)
            if _REFERENCE.search(self.text[max(0, start - 12) : start]):
                continue
            if any(a <= start and end <= b for a, b in (*self._code, *self._accounted)):
                continue
            found.append(f"{match.group(0)!r} in ...{self.text[max(0, start - 60) : end + 30]}...")
        return found


def percent(fraction: float, digits: int = 2) -> str:
    """A fraction as the documents write it: ``0.7751`` -> ``77.51 %``."""
    return f"{100 * fraction:.{digits}f} %"


def markdown_table(rows: Iterable[dict], columns: list[tuple[str, object, str]]) -> str:
    """A markdown table: one row per record row; a column is (title, key or function of the row, format)."""
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(key(row) if callable(key) else row[key], fmt) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
