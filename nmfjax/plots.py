"""Every picture nmfjax draws: learning curves, the experiments' figures and the benchmark's.

    python -m nmfjax.plots runs/cnmf_1x1 [runs/cnn ...] [--output curves.png]

One workdir: the learning curves go to ``WORKDIR/learning_curves.png``.
Several: their curves share the axes, labelled by workdir name (``--output``
names the file, default ``learning_curves.png`` in the current directory).

Each ``plot_*`` function takes the plain data an analysis returned (see
:mod:`nmfjax.experiments` and :mod:`nmfjax.bench`) and writes a PNG. Figures are
drawn with matplotlib's object interface, so importing this module selects no
backend and needs no display.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from nmfjax import cli
from nmfjax.outputs import write_output
from nmfjax.workdirs import rate_drops, trained_epochs


def save_figure(figure: Figure, output: str | pathlib.Path) -> pathlib.Path:
    """Lays out ``figure`` and writes it as PNG to ``output`` (atomically, creating its folder)."""
    figure.tight_layout()
    picture = io.BytesIO()
    figure.savefig(picture, format="png", dpi=120)
    return write_output(output, picture.getvalue())


def _colors():
    return itertools.cycle(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"])


def _log_ticks(axis, values: Sequence[int]) -> None:
    """A log x axis labelled with the plain values (1, 2, 5, 20 rather than powers of ten)."""
    axis.set_xscale("log")
    axis.set_xticks(values, [str(v) for v in values])
    axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _plain_log_axis(axis, formatter) -> None:
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: formatter(value)))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


# --- training ---


def plot_learning_curves(workdirs: list[str | pathlib.Path], output: str | pathlib.Path) -> pathlib.Path:
    """Loss and accuracy against epoch for each workdir, and the learning rates where the plateau rule
    lowered them, each lowering also marked on the loss and accuracy panels by a dotted line between
    the epoch after which the rule fired and the next; returns the PNG's path.
    """
    histories = []
    for workdir in map(pathlib.Path, workdirs):
        histories.append((workdir, trained_epochs(workdir)))
    if all(len(rows) == 1 for _, rows in histories):
        return _plot_first_epochs(histories, output)
    # The plateau rule scales every group's rate alike: its factor is the one curve worth a panel, and
    # only where it moved.
    factors = {
        workdir: [row["learning_rate_module_a"] / rows[0]["learning_rate_module_a"] for row in rows]
        for workdir, rows in histories
    }
    lowered = any(min(factor) < 1 for factor in factors.values())
    figure = Figure(figsize=(15 if lowered else 10.5, 4.2))
    axes = figure.subplots(1, 3 if lowered else 2)
    loss_axis, accuracy_axis = axes[0], axes[1]
    for (workdir, rows), color in zip(histories, _colors(), strict=False):  # train dashed, test solid
        epochs = [row["epoch"] for row in rows]
        for split, style in (("train", "--"), ("test", "-")):
            label = f"{workdir.name} {split}"
            loss_axis.plot(epochs, [row[f"{split}_loss"] for row in rows], style, color=color, marker=".", label=label)
            accuracy = [100 * row[f"{split}_accuracy"] for row in rows]
            accuracy_axis.plot(epochs, accuracy, style, color=color, marker=".", label=label)
        if lowered:
            axes[2].plot(epochs, factors[workdir], color=color, marker=".", label=workdir.name)
        for drop in rate_drops(rows):
            for axis in (loss_axis, accuracy_axis):
                axis.axvline(drop + 0.5, color=color, linestyle=":", linewidth=1, label=f"{workdir.name} rates lowered")
    loss_axis.set(title="loss (CE + 0.5 MSE) / 1.5", xlabel="epoch", ylabel="loss")
    accuracy_axis.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    if lowered:
        axes[2].set(title="learning rates / their start (plateau rule)", xlabel="epoch", ylabel="factor", yscale="log")
    else:
        figure.suptitle("learning rates constant: the plateau rule did not lower them", fontsize=9)
    for axis in axes:
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        _legend_once_per_label(axis)
    return save_figure(figure, output)


def _legend_once_per_label(axis) -> None:
    """The axis's legend with one entry per label (a run's rate drops share one)."""
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axis.legend(unique.values(), unique.keys(), fontsize=8)


def _plot_first_epochs(histories: list[tuple[pathlib.Path, list[dict[str, Any]]]], output) -> pathlib.Path:
    """Runs of one epoch each: one point is not a curve, so bars of the train and test loss and
    accuracy, each labelled with its value.
    """
    figure = Figure(figsize=(4 + 1.6 * len(histories), 4.2))
    axes = figure.subplots(1, 2)
    positions = np.arange(len(histories))
    for axis, (metric, scale, unit) in zip(axes, (("loss", 1, ""), ("accuracy", 100, " %")), strict=True):
        for offset, (split, hatch) in zip((-0.2, 0.2), (("train", "//"), ("test", "")), strict=True):
            values = [scale * rows[0][f"{split}_{metric}"] for _, rows in histories]
            bars = axis.bar(
                positions + offset,
                values,
                0.4,
                hatch=hatch,
                color=list(itertools.islice(_colors(), len(histories))),
                edgecolor="black",
                label=split,
            )
            axis.bar_label(bars, [f"{value:.3g}{unit}" for value in values], fontsize=8)
        axis.set_xticks(positions, [workdir.name for workdir, _ in histories])
        axis.set(title=f"{metric} after epoch 1", ylabel=f"{metric} (%)" if unit else metric)
        axis.margins(y=0.15)
        axis.grid(alpha=0.3, axis="y")
        axis.legend(fontsize=8, loc="lower center")
    figure.suptitle("one epoch is not a curve: the values after it (train hatched, test plain)", fontsize=9)
    return save_figure(figure, output)


# --- experiments ---


def plot_comparison(comparison: dict[str, Any], output: str | pathlib.Path) -> pathlib.Path:
    """The paper's Figure 5: best test accuracy against parameter count, one point per run
    (:func:`nmfjax.experiments.compare_runs`), with the accuracy the paper and the authors' README
    report for the same network as open marks in its colour, and the best of an earlier run of it
    (the summary's ``earlier``, where there is one) as a cross.

    Networks of equal size (CNN and CNMF; CNN+1x1 and CNMF+1x1) are drawn a little apart,
    the convolutional one to the left, so that their labels do not collide.
    """
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(10.5, 5.2))
    axis = figure.subplots()
    runs = comparison["runs"]
    parameters = [run["parameters"] for run in runs]
    span = max(parameters) - min(parameters) or max(parameters) / 10
    sources = (("paper", "D", "paper"), ("authors_readme", "s", "README"))
    for run, color in zip(runs, _colors(), strict=False):
        side = 1 if run["nmf_parameters"] else -1
        x = run["parameters"] + side * 0.04 * span
        text = {"textcoords": "offset points", "color": color, "ha": "left" if side > 0 else "right", "va": "center"}
        accuracy = 100 * run["best_test_accuracy"]
        axis.plot(x, accuracy, "o", color=color, markersize=9)
        axis.annotate(f"{run['name']}: {accuracy:.1f} %", (x, accuracy), (side * 9, 0), **text)
        if run.get("earlier"):
            before = 100 * run["earlier"]["best_test_accuracy"]
            axis.plot(x, before, "x", color=color, markersize=8)
            axis.annotate(
                f"{run['earlier']['epochs']} epochs: {before:.1f} %", (x, before), (side * 8, 0), fontsize=8, **text
            )
        shown: set[float] = set()
        for key, marker, label in sources:
            value = comparison[key].get(run["model"])
            if value is not None and value not in shown:
                shown.add(value)
                axis.plot(x, 100 * value, marker, color=color, markerfacecolor="none", markersize=8)
                axis.annotate(f"{label} {100 * value:.1f} %", (x, 100 * value), (side * 8, 0), fontsize=8, **text)
    legend = [Line2D([], [], color="grey", marker="o", linestyle="", label="nmfjax: best test accuracy")]
    legend += [
        Line2D([], [], color="grey", marker=marker, markerfacecolor="none", linestyle="", label=f"reported: {label}")
        for _, marker, label in sources
    ]
    if any(run.get("earlier") for run in runs):
        legend.append(Line2D([], [], color="grey", marker="x", linestyle="", label="nmfjax: an earlier run's best"))
    epochs = "/".join(map(str, sorted({run["epochs"] for run in runs})))
    axis.set(
        title=f"CIFAR-10: test accuracy against parameters (nmfjax after {epochs} epochs)",
        xlabel="parameters (networks of equal size drawn apart: convolutional left, NMF right)",
        ylabel="test accuracy (%)",
        xlim=(min(parameters) - 0.6 * span, max(parameters) + 0.6 * span),
    )
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value / 1000:g}k"))
    axis.grid(alpha=0.3)
    axis.legend(handles=legend, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # clear of the marks
    return save_figure(figure, output)


def plot_noise_robustness(results: dict[str, Any], output: pathlib.Path) -> pathlib.Path:
    """Accuracy against the noise level, one panel per noise kind, one curve per run."""
    kinds = [kind for kind in results["kinds"] if any(kind in run for run in results["runs"].values())]
    figure = Figure(figsize=(6 * len(kinds), 4.2))
    axes = figure.subplots(1, len(kinds), squeeze=False)
    for axis, kind in zip(axes[0], kinds, strict=True):
        for label, run in results["runs"].items():
            axis.plot(results["levels"], [100 * a for a in run[kind]], marker=".", label=label)
        axis.axhline(10, color="grey", linestyle=":", linewidth=1, label="chance")
        axis.set(title=f"{kind} noise", xlabel="noise level eta", ylabel="test accuracy (%)", ylim=(0, None))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Noise robustness ({results['test_images']} test images)")
    return save_figure(figure, output)


def plot_iterations(results: dict[str, Any], output: pathlib.Path) -> pathlib.Path:
    """Accuracy of a trained network against the iterations N it is evaluated with."""
    figure = Figure(figsize=(6, 4.2))
    axis = figure.subplots()
    axis.plot(results["iterations"], [100 * a for a in results["accuracy"]], marker="o")
    trained = results["trained_iterations"]
    axis.axvline(trained, color="red", linestyle="--", label=f"trained with N = {trained}")
    title = f"{pathlib.Path(results['workdir']).name}: NMF iterations at evaluation"
    axis.set(title=title, xlabel="iterations N", ylabel="test accuracy (%)")
    _log_ticks(axis, results["iterations"])
    axis.grid(alpha=0.3)
    axis.legend()
    return save_figure(figure, output)


def plot_gradient_study(results: dict[str, Any], output: pathlib.Path, title: str) -> pathlib.Path:
    """Cosine similarity and norm ratio with the unrolled gradient, per mode and layer, against N."""
    figure = Figure(figsize=(12, 4.2))
    cosine_axis, ratio_axis = figure.subplots(1, 2)
    rows = results["rows"]
    series = sorted({(row["mode"], row["layer"]) for row in rows})
    for (mode, layer), color in zip(series, _colors(), strict=False):
        selected = sorted(
            (row for row in rows if (row["mode"], row["layer"]) == (mode, layer)), key=lambda r: r["iterations"]
        )
        style = "-" if mode == "approx" else "--"
        iterations = [row["iterations"] for row in selected]
        for axis, key in ((cosine_axis, "cosine"), (ratio_axis, "norm_ratio")):
            axis.plot(
                iterations, [row[key] for row in selected], style, color=color, marker="o", label=f"{mode}, {layer}"
            )
    cosine_axis.set(title="cosine similarity with unrolled", xlabel="iterations N", ylabel="cosine")
    ratio_axis.set(title="norm / unrolled norm", xlabel="iterations N", ylabel="norm ratio", yscale="log")
    for axis in (cosine_axis, ratio_axis):
        _log_ticks(axis, sorted({row["iterations"] for row in rows}))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    return save_figure(figure, output)


def _grid(axes_count: int) -> tuple[int, int]:
    columns = math.ceil(math.sqrt(axes_count))
    return math.ceil(axes_count / columns), columns


def plot_filters(pictures: np.ndarray, output: pathlib.Path, title: str) -> pathlib.Path:
    """``(units, kh, kw, C)`` pictures in [0, 1] as a grid."""
    rows, columns = _grid(len(pictures))
    figure = Figure(figsize=(1.3 * columns, 1.3 * rows + 0.6))
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.set_axis_off()
        if index < len(pictures):
            picture = pictures[index]
            axis.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", interpolation="nearest")
            axis.set_title(str(index), fontsize=7)
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, output)


def plot_reconstructions(
    images: np.ndarray, reconstructed: np.ndarray, errors: np.ndarray, output, title
) -> pathlib.Path:
    """Inputs (top) over their reconstructions (bottom), with each one's relative error."""
    count = len(images)
    figure = Figure(figsize=(1.6 * count, 3.6))
    axes = figure.subplots(2, count, squeeze=False)
    for index in range(count):
        for row, picture in enumerate((images[index], reconstructed[index])):
            axis = axes[row, index]
            axis.imshow(np.clip(picture, 0, 1).squeeze(), cmap="gray", interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        axes[1, index].set_xlabel(f"error {100 * errors[index]:.1f}%", fontsize=7)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("from h")
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, output)


def plot_sparsity(sparsity: dict[str, np.ndarray], output: pathlib.Path, title: str) -> pathlib.Path:
    """One histogram of Hoyer sparsity per NMF layer."""
    figure = Figure(figsize=(3.6 * len(sparsity), 3.4))
    axes = figure.subplots(1, len(sparsity), squeeze=False)
    for axis, (layer, values) in zip(axes[0], sparsity.items(), strict=True):
        axis.hist(values, bins=40, range=(0, 1), color="tab:green")
        axis.axvline(np.mean(values), color="black", linestyle="--", label=f"mean {np.mean(values):.2f}")
        axis.set(title=f"{layer} ({values.size} positions)", xlabel="Hoyer sparsity of h", ylabel="positions")
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, output)


def plot_sweep(summaries: dict[str, dict[str, Any]], front: Sequence[int], output: pathlib.Path) -> pathlib.Path:
    """The paper's Figure 6: accuracy against parameters (with the Pareto ``front``, indices into
    ``summaries``) and against the CNN/NMF parameter ratio.
    """
    names = list(summaries)
    parameters = np.array([summaries[n]["parameters"] for n in names])
    accuracy = 100 * np.array([summaries[n]["final_test_accuracy"] for n in names])
    ratio = np.array([summaries[n]["cnn_parameters"] / max(summaries[n]["nmf_parameters"], 1) for n in names])
    front = list(front)
    epochs = sorted({summaries[n]["epochs"] for n in names})
    figure = Figure(figsize=(13, 4.8))
    left, right = figure.subplots(1, 2)
    points = left.scatter(parameters, accuracy, c=ratio, cmap="viridis", norm="log", edgecolors="black", zorder=3)
    figure.colorbar(points, ax=left, label="CNN / NMF parameters")
    left.plot(parameters[front], accuracy[front], "r-", label="Pareto front", zorder=2)
    left.set(title="accuracy vs parameters", xlabel="parameters", ylabel="test accuracy (%)")
    _plain_log_axis(left, lambda value: f"{value / 1000:g}k")
    points = right.scatter(ratio, accuracy, c=parameters, cmap="plasma", norm="log", edgecolors="black", zorder=3)
    right.scatter(
        ratio[front], accuracy[front], s=120, facecolors="none", edgecolors="red", linewidths=1.5, label="Pareto front"
    )
    figure.colorbar(points, ax=right, label="parameters")
    right.axvline(ratio[np.argmax(accuracy)], color="red", linestyle="--", label="best accuracy")
    right.set(title="accuracy vs CNN/NMF parameter ratio", xlabel="CNN / NMF parameters", ylabel="test accuracy (%)")
    _plain_log_axis(right, lambda value: f"{value:g}")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{len(names)} variants, {'/'.join(map(str, epochs))} epoch(s) each")
    return save_figure(figure, output)


def plot_final_accuracy(values: Sequence[float], summaries: Sequence[dict[str, Any]], output, xlabel) -> pathlib.Path:
    """Final and best test accuracy of short trainings against the value that varies."""
    figure = Figure(figsize=(6, 4.2))
    axis = figure.subplots()
    axis.plot(values, [100 * s["final_test_accuracy"] for s in summaries], marker="o", label="final")
    axis.plot(values, [100 * s["best_test_accuracy"] for s in summaries], marker="x", linestyle="--", label="best")
    axis.set(title=f"test accuracy after {summaries[0]['epochs']} epoch(s)", xlabel=xlabel, ylabel="test accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    return save_figure(figure, output)


# --- benchmark ---


def plot_bench(results: dict[str, Any], output: pathlib.Path) -> pathlib.Path:
    """The benchmark's Figure 1 (backward time and memory relative to the CNN) and its scaling in N and batch."""
    figure = Figure(figsize=(20, 4.2))
    axes = figure.subplots(1, 4)
    for gradient in ("unrolled", "approx", "implicit"):
        rows = [row for row in results["figure1"] if row["gradient"] == gradient]
        iterations = [row["iterations"] for row in rows]
        axes[0].plot(iterations, [row["backward_time_vs_cnn"] for row in rows], marker="o", label=f"NMF {gradient}")
        axes[1].plot(iterations, [row["backward_memory_vs_cnn"] for row in rows], marker="o", label=f"NMF {gradient}")
    for axis, title in ((axes[0], "backward time / CNN's"), (axes[1], "backward memory / CNN's")):
        axis.axhline(1.0, color="grey", linestyle=":", label="CNN")
        axis.set(title=f"Figure 1: {title}", xlabel="NMF iterations N", yscale="log")
        axis.legend(fontsize=8)
    by_n, by_batch = results["scaling"]["iterations"], results["scaling"]["batch_size"]
    for series, key in (("train", "train_step_ms"), ("eval", "eval_step_ms")):
        axes[2].plot([r["iterations"] for r in by_n], [r[key] for r in by_n], marker="o", label=f"{series} step")
    for series in ("train", "eval"):
        key = f"{series}_images_per_second"
        axes[3].plot([r["batch_size"] for r in by_batch], [r[key] for r in by_batch], marker="o", label=series)
    axes[2].set(title=f"CNMF+1x1, batch {by_n[0]['batch_size']}: time vs N", xlabel="N", ylabel="ms")
    axes[3].set(title="CNMF+1x1, N=20: throughput vs batch", xlabel="batch size", ylabel="images/s", xscale="log")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    axes[3].legend(fontsize=8)
    return save_figure(figure, output)


def main(argv: list[str] | None = None) -> None:
    """``python -m nmfjax.plots``."""
    parser = cli.ArgumentParser(
        prog="python -m nmfjax.plots", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workdirs", nargs="+", help="workdirs written by train.py")
    parser.add_argument("--output", help="PNG path (default: see above)")
    args = parser.parse_args(argv)
    output = args.output or (
        pathlib.Path(args.workdirs[0]) / "learning_curves.png" if len(args.workdirs) == 1 else "learning_curves.png"
    )
    with cli.exit_on_errors():
        print(f"wrote {plot_learning_curves(args.workdirs, output)}")


if __name__ == "__main__":
    main()
