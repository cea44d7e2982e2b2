"""Learning curves of training workdirs as PNG.

    python -m nmfjax.plots runs/cnmf_1x1 [runs/cnn ...] [--output curves.png]

One workdir: the plot goes to ``WORKDIR/learning_curves.png``. Several: their
curves share the axes, labelled by workdir name (``--output`` names the file,
default ``learning_curves.png`` in the current directory).
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nmfjax import cli  # noqa: E402
from nmfjax.errors import MissingFileError  # noqa: E402
from nmfjax.training import read_metrics  # noqa: E402


def plot_learning_curves(workdirs: list[str | pathlib.Path], output: str | pathlib.Path) -> pathlib.Path:
    """Loss, accuracy and learning rate against epoch for each workdir; returns the PNG's path."""
    figure, (loss_axis, accuracy_axis, rate_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, workdir in enumerate(workdirs):
        workdir = pathlib.Path(workdir)
        color = colors[index % len(colors)]  # one colour per workdir: train dashed, test solid
        rows = read_metrics(workdir)
        if not rows:
            raise MissingFileError(f"{workdir / 'metrics.jsonl'} holds no epochs: train with train.py first.")
        epochs = [row["epoch"] for row in rows]
        label = workdir.name
        for split, style in (("train", "--"), ("test", "-")):
            loss_axis.plot(
                epochs, [row[f"{split}_loss"] for row in rows], style, color=color, marker=".", label=f"{label} {split}"
            )
            accuracy_axis.plot(
                epochs,
                [100 * row[f"{split}_accuracy"] for row in rows],
                style,
                color=color,
                marker=".",
                label=f"{label} {split}",
            )
        rate_axis.plot(epochs, [row["learning_rate_module_a"] for row in rows], color=color, marker=".", label=label)
    loss_axis.set(title="loss (CE + 0.5 MSE) / 1.5", xlabel="epoch", ylabel="loss")
    accuracy_axis.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    rate_axis.set(title="learning rate of module a", xlabel="epoch", ylabel="learning rate", yscale="log")
    for axis in (loss_axis, accuracy_axis, rate_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return save_figure(figure, output)


def save_figure(figure, output: str | pathlib.Path) -> pathlib.Path:
    """Lays out ``figure``, writes it as PNG to ``output`` (creating its folder), closes it."""
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main(argv: list[str] | None = None) -> None:
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
