"""The paper's comparison of its four networks (arXiv 2503.20398, section 3, Figure 5) from training runs.

:func:`summarize_run` reads one workdir (or an exported network: only its
``config.json`` and ``metrics.jsonl`` are needed), finished or not;
:func:`compare_runs` puts several beside the paper's reported accuracies, and
:func:`markdown_table` writes the table.
"""

from __future__ import annotations

import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

from flax import nnx

from nmfjax import configuration, models, workdirs
from nmfjax.errors import UserError

#: Test accuracy on CIFAR-10 reported in the paper (section 3, Figure 5); CNN+1x1 has no number in its text.
PAPER_ACCURACY = {"cnn": 0.810, "cnmf": 0.815, "cnmf_1x1": 0.851}
#: ... and in the authors' README (https://github.com/mahbodnr/deep_nmf).
AUTHORS_README_ACCURACY = {"cnn": 0.810, "cnmf": 0.815, "cnmf_1x1": 0.837}
#: How tables and figures name the architectures.
MODEL_NAMES = {"cnn": "CNN", "cnn_1x1": "CNN + 1x1", "cnmf": "CNMF", "cnmf_1x1": "CNMF + 1x1"}
#: What :func:`compare_runs` keeps of an earlier run.
_EARLIER_FIELDS = ("workdir", "epochs", "best_test_accuracy", "best_epoch", "final_test_accuracy")


def summarize_run(workdir: str | pathlib.Path) -> dict[str, Any]:
    """What a run reached and what it cost, from its ``config.json`` and ``metrics.jsonl``.

    Returns:
      ``workdir``, ``model`` (the architecture), ``epochs`` (trained) and
      ``num_epochs`` (configured), ``final_test_accuracy``,
      ``best_test_accuracy`` and ``best_epoch``, ``seconds`` (the epochs'
      wall time, evaluation included), ``median_epoch_seconds``,
      ``train_images_per_second`` and ``eval_images_per_second`` (medians over
      the epochs: an epoch slowed by other work on the machine, or the first
      one's compilation, does not move them), and the parameter counts:
      ``parameters`` in all, ``nmf_parameters`` (NMF module a),
      ``cnn_parameters`` (convolutions: module a of the CNNs and the 1x1
      mixing convolutions) and ``batch_norm_parameters``.

    Raises:
      MissingFileError: the workdir has no config.json, or no epoch yet.
    """
    workdir = pathlib.Path(workdir)
    config = workdirs.load_config(workdir)
    rows = workdirs.trained_epochs(workdir)
    spec = configuration.network_spec(config)
    parameters = models.parameters_by_group(nnx.eval_shape(lambda: models.Network(spec, rngs=nnx.Rngs(0))))
    best = max(rows, key=lambda row: row["test_accuracy"])
    return {
        "workdir": str(workdir),
        "model": config.model.architecture,
        "epochs": len(rows),
        "num_epochs": config.num_epochs,
        "final_test_accuracy": rows[-1]["test_accuracy"],
        "best_test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "seconds": sum(row["epoch_seconds"] for row in rows),
        "median_epoch_seconds": statistics.median(row["epoch_seconds"] for row in rows),
        "train_images_per_second": statistics.median(row["train_images_per_second"] for row in rows),
        "eval_images_per_second": statistics.median(row["eval_images_per_second"] for row in rows),
        "parameters": sum(parameters.values()),
        "nmf_parameters": parameters["module_a"] if spec.uses_nmf else 0,
        "cnn_parameters": parameters["mixing"] + (0 if spec.uses_nmf else parameters["module_a"]),
        "batch_norm_parameters": parameters["batch_norm"],
    }


def compare_runs(
    run_directories: Sequence[str | pathlib.Path], earlier_directories: Sequence[str | pathlib.Path] = ()
) -> dict[str, Any]:
    """:func:`summarize_run` of each workdir, with the paper's accuracy for its architecture and,
    where ``earlier_directories`` hold a run of the same architecture, that earlier run's result.

    Returns:
      ``{"runs": [summary, ...], "paper": PAPER_ACCURACY, "authors_readme": AUTHORS_README_ACCURACY}``;
      each summary also has ``name`` (as :data:`MODEL_NAMES` writes it), ``paper_accuracy``
      (None where the paper reports none) and, with ``earlier_directories``, ``earlier``: the
      earlier run's ``workdir``, ``epochs``, ``best_test_accuracy``, ``best_epoch`` and
      ``final_test_accuracy`` (None where none has the architecture).

    Raises:
      UserError: two earlier runs have one architecture.
    """
    earlier: dict[str, dict[str, Any]] = {}
    for directory in earlier_directories:
        summary = summarize_run(directory)
        if summary["model"] in earlier:
            raise UserError(
                f"{earlier[summary['model']]['workdir']} and {directory} are both earlier {summary['model']} runs: "
                "name one run per architecture."
            )
        earlier[summary["model"]] = {key: summary[key] for key in _EARLIER_FIELDS}
    runs = []
    for directory in run_directories:
        summary = summarize_run(directory)
        summary["name"] = MODEL_NAMES.get(summary["model"], summary["model"])
        summary["paper_accuracy"] = PAPER_ACCURACY.get(summary["model"])
        if earlier_directories:
            summary["earlier"] = earlier.get(summary["model"])
        runs.append(summary)
    return {"runs": runs, "paper": PAPER_ACCURACY, "authors_readme": AUTHORS_README_ACCURACY}


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def _reported(model: str) -> str:
    paper, readme = PAPER_ACCURACY.get(model), AUTHORS_README_ACCURACY.get(model)
    if paper is None:
        return "not reported"
    return f"{100 * paper:.1f} %" + (
        f" (README {100 * readme:.1f} %)" if readme is not None and readme != paper else ""
    )


def _short_of_paper(run: dict[str, Any]) -> str:
    if run["paper_accuracy"] is None:
        return "-"
    points = 100 * (run["paper_accuracy"] - run["best_test_accuracy"])
    return f"{points:.1f} points short" if points > 0 else f"{-points:.1f} points above"


def markdown_table(comparison: dict[str, Any]) -> str:
    """The comparison as a Markdown table, one row per run; with earlier runs, a column of theirs."""
    with_earlier = any("earlier" in run for run in comparison["runs"])
    lines = [
        "| model | run | parameters | NMF | convolution | BatchNorm | best test accuracy (epoch) "
        "| last test accuracy | epochs | training time | epoch (median) | train img/s (median) | paper "
        "| best against the paper |" + (" earlier run: best (epoch) of epochs |" if with_earlier else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_earlier else ""),
    ]
    for run in comparison["runs"]:
        epochs = f"{run['epochs']}" + ("" if run["epochs"] >= run["num_epochs"] else f" of {run['num_epochs']}")
        line = (
            f"| {run['name']} | {pathlib.Path(run['workdir']).name} "
            f"| {run['parameters']:,} | {run['nmf_parameters']:,} | {run['cnn_parameters']:,} "
            f"| {run['batch_norm_parameters']:,} "
            f"| {100 * run['best_test_accuracy']:.2f} % ({run['best_epoch']}) "
            f"| {100 * run['final_test_accuracy']:.2f} % "
            f"| {epochs} | {_duration(run['seconds'])} | {run['median_epoch_seconds']:.0f} s "
            f"| {run['train_images_per_second']:.0f} "
            f"| {_reported(run['model'])} | {_short_of_paper(run)} |"
        )
        if with_earlier:
            before = run.get("earlier")
            line += (
                f" {100 * before['best_test_accuracy']:.2f} % ({before['best_epoch']}) of {before['epochs']} |"
                if before
                else " - |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"
