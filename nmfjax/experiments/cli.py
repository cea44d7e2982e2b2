"""``python -m nmfjax.experiments COMMAND``: each command runs one analysis, writes its
data as JSON and draws it with :mod:`nmfjax.plots`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from nmfjax import checkpoints, cli, configuration, data, models, outputs, plots, variants, workdirs
from nmfjax.errors import ConfigError
from nmfjax.experiments import compare, gradients, iterations, noise, pictures, recipe, sweep
from nmfjax.experiments.common import (
    Trained,
    evaluator,
    initialised,
    load_test_split,
    load_trained,
    write_json,
)


def _step(text: str) -> int | str:
    """An ``argparse`` type: ``best``, ``latest`` or an epoch."""
    if text in ("best", "latest"):
        return text
    try:
        return cli.positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'expected "best", "latest" or an epoch, got {text!r}') from None


def default_output(workdirs: list[str]) -> pathlib.Path:
    """Where an analysis of ``workdirs`` goes without ``--output``: ``WORKDIR/experiments`` for one,
    ``PARENT/experiments`` beside several that share a parent, else the first one's ``experiments``.
    Never the current directory, which in a clone is the repository.
    """
    paths = [pathlib.Path(workdir) for workdir in workdirs]
    parents = {path.resolve().parent for path in paths}
    if len(paths) > 1 and len(parents) == 1:
        return paths[0].parent / "experiments"
    return paths[0] / "experiments"


def _output_dir(args) -> pathlib.Path:
    return pathlib.Path(args.output) if args.output else default_output(args.workdirs)


def _report(*paths: pathlib.Path) -> None:
    for path in paths:
        print(f"wrote {path}")


def _load_runs(args, **options) -> list[Trained]:
    """The networks of ``args.workdirs`` at ``args.step``, each named with the epoch it is from."""
    runs = []
    for workdir in args.workdirs:
        run = load_trained(workdir, args.step, **options)
        if args.step is not None:
            chosen = f"--step {args.step}"
        elif checkpoints.is_exported_network(workdir):
            chosen = "the exported network's one epoch"
        else:
            chosen = "the best test accuracy; --step picks another"
        print(f"{workdir}: epoch {run.epoch} ({chosen})")
        runs.append(run)
    return runs


def _images(run: Trained, args, limit: int | None = None) -> data.Split:
    return load_test_split(run.config, args.data_dir, limit or args.limit)


def _config(args) -> Any:
    """``--config FILE`` with the ``--config.FIELD=VALUE`` overrides, parsed as train.py does."""
    return cli.override_config(configuration.config_from_file(args.config), args.overrides)


def _command_noise(args) -> None:
    runs = _load_runs(args)
    split = _images(runs[0], args)
    results = noise.noise_robustness(runs, split, kinds=args.kinds, levels=args.levels, seed=args.seed)
    output = _output_dir(args)
    _report(write_json(results, output / "noise.json"), plots.plot_noise_robustness(results, output / "noise.png"))
    first, last = results["levels"][0], results["levels"][-1]
    for label, run in results["runs"].items():
        accuracies = ", ".join(
            f"{kind} {100 * run[kind][0]:.1f}% (eta {first:g}) -> {100 * run[kind][-1]:.1f}% (eta {last:g})"
            for kind in args.kinds
        )
        print(f"{label}: {accuracies}")


def _command_iterations(args) -> None:
    (run,) = _load_runs(args)
    results = iterations.iterations_at_evaluation(run, _images(run, args), args.values)
    output = _output_dir(args)
    _report(write_json(results, output / "iterations.json"), plots.plot_iterations(results, output / "iterations.png"))
    print(
        "test accuracy: "
        + ", ".join(f"N = {n}: {100 * a:.2f}%" for n, a in zip(results["iterations"], results["accuracy"], strict=True))
    )


def _command_gradients(args) -> None:
    if bool(args.workdirs) == bool(args.config):
        cli.fail("gradients takes one WORKDIR, or --config CONFIG for a network at its initialisation.")
    (run,) = [initialised(_config(args), args.config)] if args.config else _load_runs(args)
    split = _images(run, args)
    images = data.center_crop(split.images[: args.batch], run.model.spec.input_shape[0])
    results = gradients.gradient_study(run.model, images, split.labels[: args.batch], args.values, args.modes)
    results.update(workdir=str(run.workdir), epoch=run.epoch)
    output = _output_dir(args)
    title = f"{run.label}: weight gradients vs unrolled ({results['images']} test images)"
    figure = plots.plot_gradient_study(results, output / "gradients.png", title)
    _report(write_json(results, output / "gradients.json"), figure)
    for row in results["rows"]:
        print(
            f"N={row['iterations']:>3} {row['mode']:>8} {row['layer']}: "
            f"cosine {row['cosine']:.3f}, norm ratio {row['norm_ratio']:.3g}"
        )


def _command_weights(args) -> None:
    (run,) = _load_runs(args)
    filters = pictures.first_layer_filters(run.model)
    output = _output_dir(args)
    payload = {
        "workdir": str(run.workdir),
        "epoch": run.epoch,
        "shape": list(filters.shape),
        "filters": filters.tolist(),
    }
    figure = plots.plot_filters(filters, output / "weights.png", f"{run.label}: first-layer weights")
    _report(write_json(payload, output / "weights.json"), figure)


def _command_reconstructions(args) -> None:
    (run,) = _load_runs(args)
    split = _images(run, args, limit=args.count)
    images = data.center_crop(split.images, run.model.spec.input_shape[0])
    reconstructed, errors = pictures.first_layer_reconstructions(run.model, images)
    output = _output_dir(args)
    payload = {
        "workdir": str(run.workdir),
        "epoch": run.epoch,
        "relative_l1_error": errors.tolist(),
        "mean_relative_l1_error": float(errors.mean()),
    }
    title = f"{run.label}: test images rebuilt from the first layer's h (R = W h)"
    figure = plots.plot_reconstructions(
        np.asarray(images), reconstructed, errors, output / "reconstructions.png", title
    )
    _report(write_json(payload, output / "reconstructions.json"), figure)
    print(f"mean relative L1 error: {100 * errors.mean():.2f}%")


def _command_sparsity(args) -> None:
    (run,) = _load_runs(args)
    split = _images(run, args)
    images = data.center_crop(split.images[: args.batch], run.model.spec.input_shape[0])
    sparsity = pictures.nmf_activation_sparsity(run.model, images)
    summary = {
        layer: {
            "positions": int(v.size),
            "mean": float(v.mean()),
            "median": float(np.median(v)),
            "histogram": np.histogram(v, 20, (0, 1))[0].tolist(),
        }
        for layer, v in sparsity.items()
    }
    output = _output_dir(args)
    title = f"{run.label}: sparsity of h over {images.shape[0]} test images"
    payload = {"workdir": str(run.workdir), "epoch": run.epoch, "layers": summary}
    _report(
        write_json(payload, output / "sparsity.json"), plots.plot_sparsity(sparsity, output / "sparsity.png", title)
    )
    for layer, stats in summary.items():
        print(f"{layer}: mean Hoyer sparsity {stats['mean']:.3f} over {stats['positions']} positions")


def _command_evaluate(args) -> None:
    (run,) = _load_runs(args)
    split = _images(run, args)
    recorded = {row["epoch"]: row for row in workdirs.read_metrics(run.workdir)}.get(run.epoch, {})
    results: dict[str, Any] = {
        "workdir": str(run.workdir),
        "epoch": run.epoch,
        "images": len(split),
        "batch_size": args.batch_size or run.config.eval_batch_size,
        "recorded": {key: recorded[key] for key in ("test_loss", "test_accuracy") if key in recorded},
        "batch_norm_statistics": {},
    }
    for statistics in args.statistics:
        network = load_trained(run.workdir, run.epoch, batch_norm_statistics=statistics).model
        result = evaluator(network, split, batch_size=results["batch_size"])()
        results["batch_norm_statistics"][statistics] = {"loss": result["loss"], "accuracy": result["accuracy"]}
        print(
            f"{statistics} statistics: test accuracy {100 * result['accuracy']:.2f}%, "
            f"loss {result['loss']:.4f} ({len(split):,} images, batches of {results['batch_size']})"
        )
    _report(write_json(results, _output_dir(args) / "evaluate.json"))


def _command_compare(args) -> None:
    comparison = compare.compare_runs(args.workdirs, args.earlier)
    output = _output_dir(args)
    table = compare.markdown_table(comparison)
    _report(
        write_json(comparison, output / "compare.json"),
        outputs.write_output(output / "compare.md", table),
        plots.plot_comparison(comparison, output / "figure5.png"),
        plots.plot_learning_curves(args.workdirs, output / "learning_curves.png"),
    )
    print(table, end="")


def _command_progress(args) -> None:
    output = pathlib.Path(args.output)
    published = [recipe.publish(workdir, output, args.keep_state) for workdir in args.workdirs]
    statuses = recipe.published_statuses(output)
    readme = recipe.write_status(output / "README.md", statuses)
    curves = plots.plot_learning_curves(
        [output / status["model"] for status in statuses], output / "learning_curves.png"
    )
    print(recipe.status_table(statuses).rstrip("\n"))
    kept = [status["model"] for status in published if args.keep_state and not status["ended"]]
    print(f"wrote {readme}, {curves} and {', '.join(str(output / status['model']) for status in published)}/")
    if kept:
        print(f"kept the state to resume from in {', '.join(str(output / model / recipe.RESUME) for model in kept)}")


def _command_export(args) -> None:
    weights = checkpoints.export_network(args.workdir, args.output, args.step)
    print(f"wrote {pathlib.Path(args.output) / 'config.json'}, {pathlib.Path(args.output) / 'metrics.jsonl'}")
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB)")


def _train_and_summarize(args, config, grid) -> dict[str, dict[str, Any]]:
    directories = variants.train_variants(config, grid, args.root, start_over=args.start_over)
    return {name: compare.summarize_run(workdir) for name, workdir in directories.items()}


def _command_train_iterations(args) -> None:
    grid = {f"iterations{n}": {"model.nmf.iterations": n} for n in args.values}
    summaries = _train_and_summarize(args, _config(args), grid)
    root = pathlib.Path(args.root)
    curves = plots.plot_learning_curves(
        [s["workdir"] for s in summaries.values()], root / "train_iterations_curves.png"
    )
    accuracy = plots.plot_final_accuracy(
        args.values, list(summaries.values()), root / "train_iterations.png", "iterations N in training"
    )
    _report(
        write_json({"iterations": args.values, "runs": summaries}, root / "train_iterations.json"), accuracy, curves
    )


def _command_train_gradients(args) -> None:
    summaries = _train_and_summarize(args, _config(args), {mode: {"model.nmf.gradient": mode} for mode in args.modes})
    root = pathlib.Path(args.root)
    _report(
        write_json({"modes": args.modes, "runs": summaries}, root / "train_gradients.json"),
        plots.plot_learning_curves([s["workdir"] for s in summaries.values()], root / "train_gradients.png"),
    )
    for mode, summary in summaries.items():
        print(f"{mode}: test accuracy {100 * summary['final_test_accuracy']:.2f}% in {summary['seconds']:.0f} s")


def _command_sweep(args) -> None:
    config = _config(args)
    if config.model.architecture != "cnmf_1x1":
        raise ConfigError(
            f"the sweep varies NMF and 1x1 parameters: use a cnmf_1x1 config, got model {config.model.architecture!r}."
        )
    config = configuration.with_data_defaults(config)  # the readout's width: the data's classes
    channels = data.dataset_info(config.dataset, config.data_dir).channels
    grid = sweep.sweep_variants(config.model.features, channels, args.widths, args.nmf_groups, args.mix_groups)
    overrides = {name: {f"model.{field}": value for field, value in fields.items()} for name, fields in grid.items()}
    summaries = _train_and_summarize(args, config, overrides)
    for name, fields in grid.items():
        summaries[name].update(fields)
    root = pathlib.Path(args.root)
    names = list(summaries)
    front = sweep.pareto_front(
        [summaries[n]["parameters"] for n in names], [summaries[n]["final_test_accuracy"] for n in names]
    )
    _report(
        write_json({"runs": summaries, "pareto_front": [names[i] for i in front]}, root / "sweep.json"),
        plots.plot_sweep(summaries, front, root / "sweep.png"),
    )
    print(
        "| variant | parameters | NMF | CNN (1x1) | CNN/NMF | test accuracy | seconds |\n|---|---|---|---|---|---|---|"
    )
    for name, s in sorted(summaries.items(), key=lambda item: item[1]["parameters"]):
        ratio = s["cnn_parameters"] / s["nmf_parameters"]
        print(
            f"| {name} | {s['parameters']:,} | {s['nmf_parameters']:,} | {s['cnn_parameters']:,} | {ratio:.2f} "
            f"| {100 * s['final_test_accuracy']:.2f}% | {s['seconds']:.0f} |"
        )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m nmfjax.experiments``: one subcommand per analysis."""
    parser = cli.ArgumentParser(
        prog="python -m nmfjax.experiments",
        description=cli.package_help(__name__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def on_workdirs(name, function, help_text, workdirs=1):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("workdirs", nargs=workdirs, metavar="WORKDIR", help="workdir(s) written by train.py")
        command.add_argument("--output", help="output directory (default: WORKDIR/experiments)")
        command.add_argument(
            "--step",
            type=_step,
            help='checkpoint: "best" (the default for a workdir), "latest" or an epoch; '
            "an exported network holds one epoch, which is the default",
        )
        command.add_argument("--data_dir", help="TFDS data directory (default: the workdir's config.data_dir)")
        command.add_argument("--limit", type=cli.positive_int, help="use only the first LIMIT test images")
        command.set_defaults(function=function, accepts_overrides=False)
        return command

    def with_config(command, required):
        help_text = "config file, e.g. configs/cnmf_1x1.py; fields as --config.FIELD=VALUE, as for train.py"
        command.add_argument("--config", required=required, help=help_text)
        command.set_defaults(accepts_overrides=True)

    kinds, levels = noise.NOISE_KINDS, noise.NOISE_LEVELS
    command = on_workdirs("noise", _command_noise, "test accuracy under uniform noise and holes", "+")
    command.add_argument("--kinds", nargs="+", default=list(kinds), choices=kinds)
    command.add_argument("--levels", nargs="+", type=float, default=list(levels), help="noise levels eta")
    command.add_argument("--seed", type=int, default=0)
    command = on_workdirs("iterations", _command_iterations, "test accuracy when evaluated with other N")
    command.add_argument("--values", nargs="+", type=cli.positive_int, default=[1, 2, 5, 10, 20, 50, 100])
    help_text = "approx and implicit weight gradients against unrolled, per layer"
    command = on_workdirs("gradients", _command_gradients, help_text, "*")
    with_config(command, required=False)
    command.add_argument("--values", nargs="+", type=cli.positive_int, default=[5, 20, 50], help="iterations N")
    command.add_argument("--modes", nargs="+", default=["approx", "implicit"], choices=("approx", "implicit"))
    command.add_argument("--batch", type=cli.positive_int, default=50, help="test images in the loss (default 50)")
    on_workdirs("weights", _command_weights, "the first layer's weights as a grid of colour patches")
    command = on_workdirs(
        "reconstructions", _command_reconstructions, "test images rebuilt from the first NMF layer's h"
    )
    command.add_argument("--count", type=cli.positive_int, default=8, help="how many test images (default 8)")
    command = on_workdirs("sparsity", _command_sparsity, "histograms of the Hoyer sparsity of h per NMF layer")
    command.add_argument("--batch", type=cli.positive_int, default=200, help="test images (default 200)")

    help_text = "test loss and accuracy, with the BatchNorm statistics of the batch or those kept in training"
    command = on_workdirs("evaluate", _command_evaluate, help_text)
    command.add_argument(
        "--statistics",
        nargs="+",
        default=["batch", "running"],
        choices=models.BATCH_NORM_STATISTICS,
        help="BatchNorm statistics: the test batch's own (the authors') and/or the running averages",
    )
    command.add_argument(
        "--batch_size", type=cli.positive_int, help="test batch size (default: the run's eval_batch_size)"
    )

    help_text = "the runs side by side: table, the paper's Figure 5 and learning curves"
    command = commands.add_parser("compare", help=help_text, description=help_text)
    command.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="workdirs or exported networks")
    command.add_argument(
        "--output", help="output directory (default: WORKDIR/experiments for one, PARENT/experiments beside several)"
    )
    command.add_argument(
        "--earlier",
        nargs="+",
        default=[],
        metavar="WORKDIR",
        help="earlier runs of the same architectures (e.g. shorter ones), shown beside each run of theirs",
    )
    command.set_defaults(function=_command_compare, accepts_overrides=False)
    help_text = "a trained network's weights, config and metrics, without optimiser state, for load_checkpoint"
    command = commands.add_parser("export", help=help_text, description=help_text)
    command.add_argument("workdir", metavar="WORKDIR", help="a workdir written by train.py")
    command.add_argument("--output", required=True, help="directory to write (config.json, metrics.jsonl, weights.npz)")
    command.add_argument(
        "--step", default="latest", type=_step, help='checkpoint: "latest" (default), "best" or an epoch'
    )
    command.set_defaults(function=_command_export, accepts_overrides=False)
    help_text = (
        "long runs of the paper's recipe: their records published into OUTPUT, with a status table "
        "and learning curves of every run published there"
    )
    command = commands.add_parser("progress", help=help_text, description=help_text)
    command.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="workdirs of train.py, running or ended")
    command.add_argument("--output", required=True, help="e.g. docs/reproduction/paper_recipe")
    command.add_argument(
        "--keep_state",
        action="store_true",
        help="keep each running run's newest checkpoint in OUTPUT/MODEL/resume (removed when the run ends)",
    )
    command.set_defaults(function=_command_progress, accepts_overrides=False)

    def trainings(name, function, help_text):
        command = commands.add_parser(name, help=help_text, description=help_text)
        with_config(command, required=True)
        command.add_argument("--root", required=True, help="one workdir per variant goes here")
        command.add_argument(
            "--start_over", action="store_true", help="move each variant's previous run aside and train it again"
        )
        command.set_defaults(function=function)
        return command

    command = trainings("train-iterations", _command_train_iterations, "short trainings at several N")
    command.add_argument("--values", nargs="+", type=cli.positive_int, default=[5, 10, 20, 50])
    command = trainings("train-gradients", _command_train_gradients, "short trainings with each gradient mode")
    command.add_argument("--modes", nargs="+", default=list(gradients.GRADIENT_MODES), choices=gradients.GRADIENT_MODES)
    command = trainings("sweep", _command_sweep, "width x groups sweep with the paper's Figure 6")
    command.add_argument("--widths", nargs="+", type=cli.positive_int, default=list(sweep.SWEEP_WIDTHS))
    command.add_argument("--nmf_groups", nargs="+", type=cli.positive_int, default=list(sweep.SWEEP_GROUPS))
    command.add_argument("--mix_groups", nargs="+", type=cli.positive_int, default=list(sweep.SWEEP_GROUPS))
    return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--config.FIELD=VALUE`` arguments apart from the rest (argparse cannot name them in advance)."""
    overrides = [argument[len("--config.") :] for argument in argv if argument.startswith("--config.")]
    return [argument for argument in argv if not argument.startswith("--config.")], overrides


def main(argv: list[str] | None = None) -> None:
    """``python -m nmfjax.experiments``."""
    arguments, overrides = _split_overrides(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(arguments)
    if overrides and not args.accepts_overrides:
        parser.error(f"{args.command} takes no --config.FIELD overrides, got --config.{overrides[0]}")
    if overrides and not args.config:
        parser.error("--config.FIELD overrides need --config FILE")
    args.overrides = overrides
    with cli.exit_on_errors():
        args.function(args)
