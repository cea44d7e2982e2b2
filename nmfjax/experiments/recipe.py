"""Long runs of the paper's whole recipe (arXiv 2503.20398, section 2.6: Adam, the rate divided by 10
after 10 epochs without improvement, stop when every rate is below 1e-9 or at 500 epochs), followed
while they go: their status from ``config.json`` and ``metrics.jsonl``, published into the repository
with, while a run goes on, the latest state it can resume from.

``python -m nmfjax.experiments progress WORKDIR... --output docs/reproduction/paper_recipe --keep_state``
copies each run's records to ``OUTPUT/MODEL/``, rewrites the status table of ``OUTPUT/README.md`` (a row
per run published there) and ``OUTPUT/learning_curves.png``, and keeps the newest checkpoint in
``OUTPUT/MODEL/resume/`` (a workdir to copy back and rerun ``train.py`` on), which it removes once the
run has ended.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

from nmfjax import models, workdirs
from nmfjax.errors import WorkdirError
from nmfjax.experiments.compare import MODEL_NAMES
from nmfjax.outputs import storage_errors, write_output
from nmfjax.tables import markdown_table

#: The lines of ``README.md`` between which the status table is written.
STATUS_BEGIN, STATUS_END = "<!-- status: written by python -m nmfjax.experiments progress -->", "<!-- /status -->"
#: Where a published run keeps the state it can resume from.
RESUME = "resume"


def run_status(workdir: str | pathlib.Path) -> dict[str, Any]:
    """Where a run of the recipe stands, from its records.

    Returns:
      ``model``, ``epochs`` (done) of ``num_epochs``, ``best_test_accuracy`` and
      ``best_epoch``, ``last_test_accuracy``, ``rates`` (each parameter group's
      rate for the next epoch), ``drops`` (the epochs after which the plateau
      rule divided the rates), ``ended`` and ``why`` (``"every rate below
      MIN"``, ``"NUM_EPOCHS epochs"`` or ``"running"``).
    """
    config = workdirs.load_config(workdir)
    rows = workdirs.read_metrics(workdir)
    if not rows:
        raise WorkdirError(f"{workdir} holds no finished epoch yet; run this again after the first one.")
    groups = list(models.PARAMETER_GROUPS)
    last = rows[-1]
    if "next_learning_rate_scale" in last:  # the rule's verdict on the last epoch (rows since 0.4)
        rates = {group: config.learning_rates[group] * last["next_learning_rate_scale"] for group in groups}
    else:
        rates = {group: last[f"learning_rate_{group}"] for group in groups}
    best = max(rows, key=lambda row: row["test_accuracy"])
    if max(rates.values()) < config.min_learning_rate:
        why = f"every rate below {config.min_learning_rate:g}"
    elif last["epoch"] >= config.num_epochs:
        why = f"{config.num_epochs} epochs"
    else:
        why = "running"
    return {
        "model": config.model.architecture,
        "epochs": last["epoch"],
        "num_epochs": config.num_epochs,
        "best_test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "last_test_accuracy": last["test_accuracy"],
        "rates": rates,
        "drops": workdirs.rate_drops(rows),
        "ended": why != "running",
        "why": why,
    }


def status_table(statuses: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`run_status` results, a row per run."""
    rows = [
        {
            **status,
            "name": MODEL_NAMES.get(status["model"], status["model"]),
            "epochs_text": f"{status['epochs']} of {status['num_epochs']}",
            "best_text": f"{100 * status['best_test_accuracy']:.2f} % ({status['best_epoch']})",
            "last_text": f"{100 * status['last_test_accuracy']:.2f} %",
            "rates_text": " / ".join(f"{status['rates'][group]:g}" for group in models.PARAMETER_GROUPS),
            "drops_text": ", ".join(str(epoch) for epoch in status["drops"]) or "none yet",
            "end_text": f"ended: {status['why']}" if status["ended"] else "running",
        }
        for status in statuses
    ]
    return markdown_table(
        rows,
        [
            ("model", "name", "s"),
            ("epochs", "epochs_text", "s"),
            ("best test accuracy (epoch)", "best_text", "s"),
            ("last", "last_text", "s"),
            ("rates now (" + " / ".join(models.PARAMETER_GROUPS) + ")", "rates_text", "s"),
            ("plateau rule fired after epoch", "drops_text", "s"),
            ("status", "end_text", "s"),
        ],
    )


def publish(workdir: str | pathlib.Path, output: str | pathlib.Path, keep_state: bool) -> dict[str, Any]:
    """Copies a run's ``config.json`` (``data_dir`` cleared) and ``metrics.jsonl`` to ``OUTPUT/MODEL/``;
    with ``keep_state``, while the run goes on, its newest checkpoint to ``OUTPUT/MODEL/resume/``
    (replacing the one before), removed once the run has ended. Returns the run's :func:`run_status`.
    """
    workdir = pathlib.Path(workdir)
    status = run_status(workdir)
    target = pathlib.Path(output) / status["model"]
    config = workdirs.load_config(workdir)
    config.data_dir = None  # a path on the machine that trains it
    config_text = config.to_json_best_effort(indent=2) + "\n"
    metrics_text = (workdir / "metrics.jsonl").read_text()
    write_output(target / "config.json", config_text)
    write_output(target / "metrics.jsonl", metrics_text)
    resume = target / RESUME
    with storage_errors(resume, "Free space, and run the command again."):
        if status["ended"] or not keep_state:
            if status["ended"]:
                shutil.rmtree(resume, ignore_errors=True)
            return status
        newest = _newest_checkpoint(workdir)
        fresh = resume.with_name(f".{RESUME}.partial")
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.copytree(newest, fresh / "checkpoints" / newest.name)
        # A workdir's records end at its newest checkpoint: later rows would have no state to resume.
        kept = [line for line in metrics_text.splitlines(keepends=True) if _epoch(line) <= int(newest.name)]
        (fresh / "metrics.jsonl").write_text("".join(kept))
        (fresh / "config.json").write_text(config_text)
        shutil.rmtree(resume, ignore_errors=True)
        fresh.rename(resume)
    return status


def published_statuses(output: str | pathlib.Path) -> list[dict[str, Any]]:
    """:func:`run_status` of every run published in ``output`` (each ``OUTPUT/MODEL/`` with its records),
    in the order of :data:`~nmfjax.experiments.compare.MODEL_NAMES`: a run published before stays in the
    table while another is published alone.
    """
    published = [path for path in pathlib.Path(output).iterdir() if (path / "metrics.jsonl").is_file()]
    order = list(MODEL_NAMES)  # every architecture a config may name
    return sorted((run_status(path) for path in published), key=lambda status: order.index(status["model"]))


def _newest_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
    complete = [path for path in (workdir / "checkpoints").glob("[0-9]*") if (path / "commit_success.txt").exists()]
    if not complete:
        raise WorkdirError(f"{workdir / 'checkpoints'} holds no complete checkpoint to keep.")
    return max(complete, key=lambda path: int(path.name))


def _epoch(line: str) -> int:
    return int(json.loads(line)["epoch"]) if line.strip() else 0


def write_status(readme: pathlib.Path, statuses: list[dict[str, Any]]) -> pathlib.Path:
    """Replaces the status table between :data:`STATUS_BEGIN` and :data:`STATUS_END` in ``readme``
    (appended, with its markers, where it has none; the rest of the file is kept).
    """
    table = status_table(statuses).rstrip("\n")
    block = f"{STATUS_BEGIN}\n{table}\n{STATUS_END}\n"
    text = readme.read_text() if readme.exists() else ""
    if STATUS_BEGIN in text and STATUS_END in text:
        head, rest = text.split(STATUS_BEGIN, 1)
        tail = rest.split(STATUS_END, 1)[1].removeprefix("\n")
        text = head + block + tail
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + block
    return write_output(readme, text)
