"""The paper's analyses as commands (SPEC sections 1 and 5); each writes JSON and a PNG.

On trained workdirs (written by ``train.py``)::

    python -m nmfjax.experiments noise runs/cnn runs/cnmf runs/cnmf_1x1 --output experiments/noise
    python -m nmfjax.experiments iterations runs/cnmf_1x1 --values 1 2 5 10 20 50 100
    python -m nmfjax.experiments gradients runs/cnmf_1x1 --values 5 20 50
    python -m nmfjax.experiments gradients --config configs/cnmf_1x1.py   # the network at its initialisation
    python -m nmfjax.experiments weights runs/cnmf_1x1
    python -m nmfjax.experiments reconstructions runs/cnmf_1x1
    python -m nmfjax.experiments sparsity runs/cnmf_1x1

Short trainings, one workdir per variant under ``--root`` (rerunning resumes
unfinished variants and skips finished ones; ``--set FIELD=VALUE`` changes the
config of every variant)::

    python -m nmfjax.experiments train-iterations --config configs/cnmf_1x1.py --values 5 10 20 --root runs/iterations
    python -m nmfjax.experiments train-gradients --config configs/cnmf_1x1.py --root runs/gradients
    python -m nmfjax.experiments sweep --config configs/cnmf_1x1.py --root runs/sweep

Outputs go to ``--output`` (default: ``WORKDIR/experiments`` for one workdir,
``experiments/`` for several, ``--root`` for trainings). Commands that read
test images take ``--data_dir`` (default: the workdir's ``config.data_dir``)
and ``--limit`` (the first test images only).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from nmfjax import cli, data, models, ops, plots, training  # noqa: E402
from nmfjax.errors import ConfigError  # noqa: E402
from nmfjax.layers import NMFConv  # noqa: E402

NOISE_KINDS = ("uniform", "holes")
NOISE_LEVELS = tuple(round(0.05 * step, 2) for step in range(21))  # SPEC section 5: 0, 0.05, ..., 1.0
GRADIENT_MODES = ("approx", "implicit", "unrolled")
SWEEP_WIDTHS = (1, 2, 4, 8)  # paper section 3.1
SWEEP_GROUPS = (1, 2, 4, 8, 16)


# --- trained networks ---


@dataclasses.dataclass
class Trained:
    """A network restored from a workdir."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    model: models.Network
    epoch: int

    @property
    def label(self) -> str:
        if self.epoch == 0:
            return f"{self.config.model} at initialisation"
        return f"{self.workdir.name} ({self.config.model}, epoch {self.epoch})"


def load_trained(workdir: str | pathlib.Path, step: int | str | None = "best") -> Trained:
    """The network of a workdir at ``step``: an epoch, ``"best"`` or ``"latest"``."""
    config, model, _, epoch = training.load_checkpoint(workdir, step)
    return Trained(pathlib.Path(workdir), config, model, epoch)


def with_nmf_options(model: models.Network, **changes) -> models.Network:
    """The same network and weights with other :class:`~nmfjax.models.NetworkSpec` fields,
    e.g. ``iterations=50`` or ``gradient="unrolled"``."""
    network = models.Network(dataclasses.replace(model.spec, **changes), rngs=nnx.Rngs(0))
    nnx.update(network, nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))
    return network


def _in_evaluation_mode(model: models.Network) -> models.Network:
    """A copy in evaluation mode (BatchNorm with running statistics uses them); ``model`` is left as it is."""
    model = nnx.clone(model)
    model.eval()
    return model


def load_test_split(config: ml_collections.ConfigDict, data_dir: str | None, limit: int | None) -> data.Split:
    """The test split of a run's dataset (from ``data_dir``, else the run's own), first ``limit`` images."""
    return data.load_split(
        config.dataset, "test", data_dir=data_dir or config.data_dir, download=config.download, limit=limit
    )


# --- evaluation under noise (SPEC section 5) ---


def _l1_normalize_images(images: jax.Array) -> jax.Array:
    return ops.l1_normalize(images.reshape(images.shape[0], -1)).reshape(images.shape)


def add_noise(key: jax.Array, images: jax.Array, kind: str, eta: float | jax.Array) -> jax.Array:
    """SPEC section 5's test-time corruptions of a batch.

    ``"uniform"``: ``(1 - eta) * x / sum(x) + eta * n / sum(n)``, ``n ~ U(0, 1)``
    per value; ``"holes"``: every pixel (all its channels) kept with probability
    ``1 - eta``, then the image divided by its sum.

    Args:
      key: a ``jax.random.key``.
      images: ``(B, H, W, C)`` float in [0, 1], before the centre crop.
      kind: one of :data:`NOISE_KINDS`.
      eta: noise level in [0, 1].

    Returns:
      ``(B, H, W, C)`` non-negative images, each summing to one (or all zero).
    """
    if kind == "uniform":
        noise = jax.random.uniform(key, images.shape, images.dtype)
        return (1 - eta) * _l1_normalize_images(images) + eta * _l1_normalize_images(noise)
    if kind == "holes":
        keep = jax.random.bernoulli(key, 1 - eta, (*images.shape[:3], 1))
        return _l1_normalize_images(jnp.where(keep, images, 0.0))
    raise ConfigError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}.")


@functools.partial(jax.jit, static_argnames=("graphdef", "crop_size", "noise"))
def _evaluate_batch(state, images, labels, eta, key, *, graphdef, crop_size, noise):
    pixels = images.astype(jnp.float32) / 255.0
    if noise is not None:
        pixels = add_noise(key, pixels, noise, eta)
    model = nnx.merge(graphdef, state)
    return training.summed_metrics(model.logits(data.center_crop(pixels, crop_size)), labels)


def evaluate(
    model: models.Network,
    split: data.Split,
    *,
    batch_size: int,
    noise: str | None = None,
    eta: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Test accuracy and loss of ``model`` (in evaluation mode) on ``split``, centre-cropped
    as in training, optionally corrupted by :func:`add_noise` first.

    Batches of ``batch_size`` as the evaluation in training (with the authors'
    batch statistics in BatchNorm the batch size matters). The noise of batch
    ``i`` comes from ``(seed, i)`` alone, so every model sees the same noise.
    """
    model = _in_evaluation_mode(model)
    graphdef, state = nnx.split(model)
    crop_size = model.spec.input_shape[0]
    totals = None
    for index, start in enumerate(range(0, len(split), batch_size)):
        batch = slice(start, start + batch_size)
        key = jax.random.fold_in(jax.random.key(seed), index)
        result = _evaluate_batch(
            state,
            split.images[batch],
            split.labels[batch],
            jnp.float32(eta),
            key,
            graphdef=graphdef,
            crop_size=crop_size,
            noise=noise,
        )
        totals = result if totals is None else jax.tree.map(jnp.add, totals, result)
    totals = jax.device_get(totals)
    return {"accuracy": float(totals["correct"] / totals["count"]), "loss": float(totals["loss"] / totals["count"])}


def noise_robustness(
    runs: Sequence[Trained],
    split: data.Split,
    *,
    kinds: Sequence[str] = NOISE_KINDS,
    levels: Sequence[float] = NOISE_LEVELS,
    seed: int = 0,
) -> dict[str, Any]:
    """Test accuracy of each run at every noise kind and level (the same noise for every run)."""
    results = {}
    progress = tqdm(total=len(runs) * len(kinds) * len(levels), desc="noise", unit="eval")
    for run in runs:
        accuracies = {}
        for kind in kinds:
            accuracies[kind] = []
            for eta in levels:
                metrics = evaluate(
                    run.model, split, batch_size=run.config.eval_batch_size, noise=kind, eta=eta, seed=seed
                )
                accuracies[kind].append(metrics["accuracy"])
                progress.update()
        results[run.label] = {"workdir": str(run.workdir), "model": run.config.model, "epoch": run.epoch, **accuracies}
    progress.close()
    return {"levels": list(levels), "test_images": len(split), "seed": seed, "runs": results}


def plot_noise_robustness(results: dict[str, Any], output: pathlib.Path) -> pathlib.Path:
    kinds = [kind for kind in NOISE_KINDS if any(kind in run for run in results["runs"].values())]
    figure, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for label, run in results["runs"].items():
            axis.plot(results["levels"], [100 * a for a in run[kind]], marker=".", label=label)
        axis.axhline(10, color="grey", linestyle=":", linewidth=1, label="chance")
        axis.set(title=f"{kind} noise", xlabel="noise level eta", ylabel="test accuracy (%)", ylim=(0, None))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Noise robustness ({results['test_images']} test images)")
    return plots.save_figure(figure, output)


# --- iterations at evaluation ---


def iterations_at_evaluation(run: Trained, split: data.Split, values: Sequence[int]) -> dict[str, Any]:
    """Test accuracy of a trained network evaluated with ``N`` NMF iterations, for each ``N``."""
    accuracies = []
    for iterations in tqdm(values, desc="iterations", unit="N"):
        model = with_nmf_options(run.model, iterations=iterations)
        accuracies.append(evaluate(model, split, batch_size=run.config.eval_batch_size)["accuracy"])
    return {
        "workdir": str(run.workdir),
        "model": run.config.model,
        "epoch": run.epoch,
        "trained_iterations": run.model.spec.iterations,
        "test_images": len(split),
        "iterations": list(values),
        "accuracy": accuracies,
    }


def plot_iterations(results: dict[str, Any], output: pathlib.Path) -> pathlib.Path:
    figure, axis = plt.subplots(figsize=(6, 4.2))
    axis.plot(results["iterations"], [100 * a for a in results["accuracy"]], marker="o")
    axis.axvline(
        results["trained_iterations"],
        color="red",
        linestyle="--",
        label=f"trained with N = {results['trained_iterations']}",
    )
    axis.set(
        title=f"{pathlib.Path(results['workdir']).name}: NMF iterations at evaluation",
        xlabel="iterations N",
        ylabel="test accuracy (%)",
    )
    _log_ticks(axis, results["iterations"])
    axis.grid(alpha=0.3)
    axis.legend()
    return plots.save_figure(figure, output)


# --- gradient study (SPEC section 1) ---


def _layer_name(path) -> str:
    names = [str(getattr(entry, "key", getattr(entry, "idx", entry))) for entry in path]
    return f"block {int(names[1]) + 1}" if names[:1] == ["blocks"] else "/".join(names)


@functools.partial(jax.jit, static_argnames="graphdef")
def _loss_gradient(params, rest, images, labels, *, graphdef):
    def loss(params):
        model = nnx.merge(graphdef, params, jax.tree.map(jnp.asarray, rest))
        return jnp.mean(training.composite_loss(model.logits(images), labels))

    return jax.grad(loss)(params)


def module_a_gradients(model: models.Network, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Gradient of the mean training loss (training mode) for each block's module-a kernel."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    gradients = _loss_gradient(params, rest, images, labels, graphdef=graphdef)
    return {
        _layer_name(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(gradients)[0]
        if models.parameter_group(path) == "module_a"
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def _backprop_gradients(model, images, labels, iterations: int, gradient: str) -> dict[str, np.ndarray]:
    network = with_nmf_options(model, iterations=iterations, gradient=gradient, learning="backprop")
    return jax.device_get(module_a_gradients(network, images, labels))


def gradient_study(
    model: models.Network,
    images: jax.Array,
    labels: jax.Array,
    values: Sequence[int],
    modes: Sequence[str] = ("approx", "implicit"),
) -> dict[str, Any]:
    """Per NMF layer: cosine similarity and norm ratio of each mode's weight gradient
    against the ``"unrolled"`` (exact autodiff) gradient, at each number of iterations.

    The same weights, images and labels for every mode; NMF layers learn by
    backprop here whatever the model was trained with.
    """
    if not model.spec.uses_nmf:
        raise ConfigError(f"the gradient study needs an NMF network (cnmf, cnmf_1x1), got {model.spec.architecture!r}.")
    rows = []
    for iterations in tqdm(values, desc="gradients", unit="N"):
        exact = _backprop_gradients(model, images, labels, iterations, "unrolled")
        for mode in modes:
            for layer, gradient in _backprop_gradients(model, images, labels, iterations, mode).items():
                rows.append(
                    {
                        "iterations": iterations,
                        "mode": mode,
                        "layer": layer,
                        "cosine": _cosine(gradient, exact[layer]),
                        "norm_ratio": float(np.linalg.norm(gradient) / (np.linalg.norm(exact[layer]) + 1e-300)),
                    }
                )
    return {"images": int(images.shape[0]), "rows": rows}


def plot_gradient_study(results: dict[str, Any], output: pathlib.Path, title: str) -> pathlib.Path:
    figure, (cosine_axis, ratio_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = results["rows"]
    series = sorted({(row["mode"], row["layer"]) for row in rows})
    for (mode, layer), color in zip(series, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])):
        selected = sorted(
            (row for row in rows if (row["mode"], row["layer"]) == (mode, layer)), key=lambda r: r["iterations"]
        )
        style = "-" if mode == "approx" else "--"
        label = f"{mode}, {layer}"
        iterations = [row["iterations"] for row in selected]
        cosine_axis.plot(iterations, [row["cosine"] for row in selected], style, color=color, marker="o", label=label)
        ratio_axis.plot(
            iterations, [row["norm_ratio"] for row in selected], style, color=color, marker="o", label=label
        )
    cosine_axis.set(title="cosine similarity with unrolled", xlabel="iterations N", ylabel="cosine")
    ratio_axis.set(title="norm / unrolled norm", xlabel="iterations N", ylabel="norm ratio", yscale="log")
    for axis in (cosine_axis, ratio_axis):
        _log_ticks(axis, sorted({row["iterations"] for row in rows}))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    return plots.save_figure(figure, output)


# --- pictures ---


def first_layer_filters(model: models.Network) -> np.ndarray:
    """The first block's module-a weights as ``(units, kh, kw, C)`` pictures in [0, 1].

    NMF: each unit's column of ``W`` (non-negative, summing to one) scaled to its
    maximum; CNN: each filter min-max scaled.
    """
    layer = model.blocks[0].module_a
    if layer.feature_group_count != 1:
        raise ConfigError(
            f"the first layer has feature_group_count={layer.feature_group_count}: "
            "its weights are pictures only with one group."
        )
    if isinstance(layer, NMFConv):
        weights = np.asarray(layer.nmf_weights()[0]).T  # (I, S)
        pictures = weights / weights.max(axis=1, keepdims=True)
    else:
        weights = np.asarray(layer.kernel[...]).reshape(-1, layer.out_features).T
        low, high = weights.min(axis=1, keepdims=True), weights.max(axis=1, keepdims=True)
        pictures = (weights - low) / np.maximum(high - low, 1e-12)
    return pictures.reshape(-1, *layer.kernel_size, layer.in_features)


def _grid(axes_count: int) -> tuple[int, int]:
    columns = math.ceil(math.sqrt(axes_count))
    return math.ceil(axes_count / columns), columns


def plot_filters(pictures: np.ndarray, output: pathlib.Path, title: str) -> pathlib.Path:
    rows, columns = _grid(len(pictures))
    figure, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.3 * rows + 0.6), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.set_axis_off()
        if index < len(pictures):
            picture = pictures[index]
            axis.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", interpolation="nearest")
            axis.set_title(str(index), fontsize=7)
    figure.suptitle(title, fontsize=9)
    return plots.save_figure(figure, output)


def first_layer_reconstructions(model: models.Network, images: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Images rebuilt from the first NMF layer's ``h`` (:meth:`NMFConv.reconstruct`) and the
    relative L1 error of each, over the pixels the layer's patches cover."""
    layer = model.blocks[0].module_a
    if not isinstance(layer, NMFConv):
        raise ConfigError(f"reconstructions need an NMF first layer; {model.spec.architecture!r} has a convolution.")
    reconstructed = jax.jit(lambda x: layer.reconstruct(nnx.relu(x)))(images)
    errors = jnp.sum(jnp.abs(reconstructed - images), axis=(1, 2, 3)) / jnp.sum(images, axis=(1, 2, 3))
    return np.asarray(reconstructed), np.asarray(errors)


def plot_reconstructions(
    images: np.ndarray, reconstructed: np.ndarray, errors: np.ndarray, output, title
) -> pathlib.Path:
    count = len(images)
    figure, axes = plt.subplots(2, count, figsize=(1.6 * count, 3.6), squeeze=False)
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
    return plots.save_figure(figure, output)


def hoyer_sparsity(h: jax.Array) -> jax.Array:
    """Hoyer's sparsity over the last axis: 0 for a uniform vector, 1 for a one-hot one."""
    n = h.shape[-1]
    ratio = jnp.sum(jnp.abs(h), -1) / (jnp.linalg.norm(h, axis=-1) + 1e-30)
    return (math.sqrt(n) - ratio) / (math.sqrt(n) - 1)


def nmf_activation_sparsity(model: models.Network, images: jax.Array) -> dict[str, np.ndarray]:
    """Hoyer sparsity of ``h`` at every position of every NMF layer (evaluation mode)."""
    model = _in_evaluation_mode(model)
    _, intermediates = nnx.capture(model.logits, nnx.Intermediate, method_outputs=nnx.Intermediate)(images)
    sparsity = {}
    for index, block in enumerate(model.blocks):
        if isinstance(block.module_a, NMFConv) and block.module_a.out_features > 1:
            (h,) = intermediates["blocks"][index]["module_a"]["__call__"]
            sparsity[f"block {index + 1}"] = np.asarray(hoyer_sparsity(h)).ravel()
    if not sparsity:
        raise ConfigError(f"{model.spec.architecture!r} has no NMF layer: use cnmf or cnmf_1x1 workdirs.")
    return sparsity


def plot_sparsity(sparsity: dict[str, np.ndarray], output: pathlib.Path, title: str) -> pathlib.Path:
    figure, axes = plt.subplots(1, len(sparsity), figsize=(3.6 * len(sparsity), 3.4), squeeze=False)
    for axis, (layer, values) in zip(axes[0], sparsity.items()):
        axis.hist(values, bins=40, range=(0, 1), color="tab:green")
        axis.axvline(np.mean(values), color="black", linestyle="--", label=f"mean {np.mean(values):.2f}")
        axis.set(title=f"{layer} ({values.size} positions)", xlabel="Hoyer sparsity of h", ylabel="positions")
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    return plots.save_figure(figure, output)


# --- short trainings of config variants ---


def train_variants(
    config: ml_collections.ConfigDict,
    variants: dict[str, dict[str, Any]],
    root: str | pathlib.Path,
    *,
    start_over: bool = False,
) -> dict[str, pathlib.Path]:
    """Trains ``config`` with each variant's overrides into ``root/<name>``.

    Variants whose workdir already holds ``num_epochs`` epochs are skipped;
    unfinished ones resume from their latest checkpoint. With ``start_over``,
    every variant's previous run is moved aside and trained again.

    Returns:
      ``{name: workdir}``.
    """
    root = pathlib.Path(root)
    workdirs = {}
    for position, (name, overrides) in enumerate(variants.items(), 1):
        variant = training.apply_overrides(config, overrides)
        workdir = workdirs[name] = root / name
        done = len(training.read_metrics(workdir))
        if done >= variant.num_epochs and not start_over:
            print(f"[{position}/{len(variants)}] {name}: finished ({done} epochs), skipped.")
            continue
        print(f"[{position}/{len(variants)}] {name}: training {overrides}", flush=True)
        training.train_and_evaluate(variant, workdir, start_over=start_over)
    return workdirs


def summarize_run(workdir: pathlib.Path) -> dict[str, Any]:
    """Parameters by group, final and best test accuracy, and time of a finished workdir."""
    config = training.load_config(workdir)
    rows = training.read_metrics(workdir)
    spec = training.network_spec(config)
    network = nnx.eval_shape(lambda: models.Network(spec, rngs=nnx.Rngs(0)))
    parameters = {"module_a": 0, "mixing": 0, "batch_norm": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(network, nnx.Param))[0]:
        parameters[models.parameter_group(path)] += math.prod(leaf.shape)
    return {
        "workdir": str(workdir),
        "epochs": len(rows),
        "final_test_accuracy": rows[-1]["test_accuracy"],
        "best_test_accuracy": max(row["test_accuracy"] for row in rows),
        "seconds": sum(row["epoch_seconds"] for row in rows),
        "parameters": sum(parameters.values()),
        "nmf_parameters": parameters["module_a"] if spec.uses_nmf else 0,
        "cnn_parameters": parameters["mixing"] + (0 if spec.uses_nmf else parameters["module_a"]),
        "batch_norm_parameters": parameters["batch_norm"],
    }


def _groups_where_they_divide(groups: int, inputs: Sequence[int], outputs: Sequence[int]) -> tuple[int, ...]:
    return tuple(groups if i % groups == 0 and o % groups == 0 else 1 for i, o in zip(inputs, outputs))


def sweep_variants(
    features: Sequence[int],
    channels: int,
    widths: Sequence[int] = SWEEP_WIDTHS,
    nmf_groups: Sequence[int] = SWEEP_GROUPS,
    mix_groups: Sequence[int] = SWEEP_GROUPS,
) -> dict[str, dict[str, Any]]:
    """The paper's section 3.1 grid: width x NMF groups x 1x1 groups, for a network
    with ``features`` outputs per block on images with ``channels`` channels.

    A group count applies to every block whose input and output channel counts
    it divides (blocks whose counts it does not divide, such as the RGB input
    or the 10 classes, keep one group).
    """
    variants = {}
    for width, nmf_group, mix_group in itertools.product(widths, nmf_groups, mix_groups):
        outputs = [f * width for f in features[:-1]] + [features[-1]]
        inputs = [channels, *outputs[:-1]]
        variants[f"width{width}_nmf{nmf_group}_mix{mix_group}"] = {
            "width": width,
            "groups": _groups_where_they_divide(nmf_group, inputs, outputs),
            "mix_groups": _groups_where_they_divide(mix_group, outputs, outputs),
        }
    return variants


def pareto_front(parameters: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the runs no smaller run beats or equals in accuracy, by increasing size."""
    front, best = [], -math.inf
    for index in sorted(range(len(parameters)), key=lambda i: (parameters[i], -accuracies[i])):
        if accuracies[index] > best:
            front.append(index)
            best = accuracies[index]
    return front


def _plain_log_axis(axis, formatter) -> None:
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: formatter(value)))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_sweep(summaries: dict[str, dict[str, Any]], output: pathlib.Path) -> pathlib.Path:
    """The paper's Figure 6: accuracy against parameters (Pareto front) and against the CNN/NMF ratio."""
    names = list(summaries)
    parameters = np.array([summaries[n]["parameters"] for n in names])
    accuracy = 100 * np.array([summaries[n]["final_test_accuracy"] for n in names])
    ratio = np.array([summaries[n]["cnn_parameters"] / max(summaries[n]["nmf_parameters"], 1) for n in names])
    front = pareto_front(parameters, accuracy)
    epochs = sorted({summaries[n]["epochs"] for n in names})
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
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
    return plots.save_figure(figure, output)


def plot_final_accuracy(values: Sequence[float], summaries: Sequence[dict[str, Any]], output, xlabel) -> pathlib.Path:
    figure, axis = plt.subplots(figsize=(6, 4.2))
    axis.plot(values, [100 * s["final_test_accuracy"] for s in summaries], marker="o", label="final")
    axis.plot(values, [100 * s["best_test_accuracy"] for s in summaries], marker="x", linestyle="--", label="best")
    axis.set(title=f"test accuracy after {summaries[0]['epochs']} epoch(s)", xlabel=xlabel, ylabel="test accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    return plots.save_figure(figure, output)


# --- command line ---


def _log_ticks(axis, values: Sequence[int]) -> None:
    """A log x axis labelled with the plain values (1, 2, 5, 20 rather than powers of ten)."""
    axis.set_xscale("log")
    axis.set_xticks(values, [str(v) for v in values])
    axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _write_json(payload: Any, output: pathlib.Path) -> pathlib.Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2) + "\n")
    return output


def _step(text: str) -> int | str:
    """An ``argparse`` type: ``best``, ``latest`` or an epoch."""
    if text in ("best", "latest"):
        return text
    try:
        return cli.positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'expected "best", "latest" or an epoch, got {text!r}') from None


def _output_dir(args) -> pathlib.Path:
    if args.output:
        return pathlib.Path(args.output)
    return pathlib.Path(args.workdirs[0]) / "experiments" if len(args.workdirs) == 1 else pathlib.Path("experiments")


def _report(*paths: pathlib.Path) -> None:
    for path in paths:
        print(f"wrote {path}")


def _load_runs(args) -> list[Trained]:
    return [load_trained(workdir, args.step) for workdir in args.workdirs]


def _images(run: Trained, args) -> data.Split:
    return load_test_split(run.config, args.data_dir, args.limit)


def _command_noise(args) -> None:
    runs = _load_runs(args)
    split = _images(runs[0], args)
    results = noise_robustness(runs, split, kinds=args.kinds, levels=args.levels, seed=args.seed)
    output = _output_dir(args)
    _report(_write_json(results, output / "noise.json"), plot_noise_robustness(results, output / "noise.png"))
    for label, run in results["runs"].items():
        print(label, {kind: f"{100 * run[kind][0]:.1f}% -> {100 * run[kind][-1]:.1f}%" for kind in args.kinds})


def _command_iterations(args) -> None:
    (run,) = _load_runs(args)
    results = iterations_at_evaluation(run, _images(run, args), args.values)
    output = _output_dir(args)
    _report(_write_json(results, output / "iterations.json"), plot_iterations(results, output / "iterations.png"))
    print({n: f"{100 * a:.2f}%" for n, a in zip(results["iterations"], results["accuracy"])})


def _command_gradients(args) -> None:
    if bool(args.workdirs) == bool(args.config):
        cli.fail("gradients takes one WORKDIR, or --config CONFIG for a network at its initialisation.")
    if args.config:
        config = cli.override_config(training.config_from_file(args.config), args.set)
        network = models.Network(training.network_spec(config), rngs=nnx.Rngs(config.seed))
        run = Trained(pathlib.Path(args.config), config, network, epoch=0)
    else:
        (run,) = _load_runs(args)
    split = _images(run, args)
    images = data.center_crop(split.images[: args.batch], run.model.spec.input_shape[0])
    results = gradient_study(run.model, images, split.labels[: args.batch], args.values, args.modes)
    results.update(workdir=str(run.workdir), epoch=run.epoch)
    output = _output_dir(args)
    title = f"{run.label}: weight gradients vs unrolled ({results['images']} test images)"
    _report(
        _write_json(results, output / "gradients.json"), plot_gradient_study(results, output / "gradients.png", title)
    )
    for row in results["rows"]:
        print(
            f"N={row['iterations']:>3} {row['mode']:>8} {row['layer']}: cosine {row['cosine']:.3f}, norm ratio {row['norm_ratio']:.3g}"
        )


def _command_weights(args) -> None:
    (run,) = _load_runs(args)
    pictures = first_layer_filters(run.model)
    output = _output_dir(args)
    payload = {
        "workdir": str(run.workdir),
        "epoch": run.epoch,
        "shape": list(pictures.shape),
        "filters": pictures.tolist(),
    }
    _report(
        _write_json(payload, output / "weights.json"),
        plot_filters(pictures, output / "weights.png", f"{run.label}: first-layer weights"),
    )


def _command_reconstructions(args) -> None:
    (run,) = _load_runs(args)
    split = load_test_split(run.config, args.data_dir, args.count)
    images = data.center_crop(split.images, run.model.spec.input_shape[0])
    reconstructed, errors = first_layer_reconstructions(run.model, images)
    output = _output_dir(args)
    payload = {
        "workdir": str(run.workdir),
        "epoch": run.epoch,
        "relative_l1_error": errors.tolist(),
        "mean_relative_l1_error": float(errors.mean()),
    }
    title = f"{run.label}: test images rebuilt from the first layer's h (R = W h)"
    _report(
        _write_json(payload, output / "reconstructions.json"),
        plot_reconstructions(np.asarray(images), reconstructed, errors, output / "reconstructions.png", title),
    )
    print(f"mean relative L1 error: {100 * errors.mean():.2f}%")


def _command_sparsity(args) -> None:
    (run,) = _load_runs(args)
    split = _images(run, args)
    images = data.center_crop(split.images[: args.batch], run.model.spec.input_shape[0])
    sparsity = nmf_activation_sparsity(run.model, images)
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
    _report(
        _write_json({"workdir": str(run.workdir), "epoch": run.epoch, "layers": summary}, output / "sparsity.json"),
        plot_sparsity(sparsity, output / "sparsity.png", title),
    )
    for layer, stats in summary.items():
        print(f"{layer}: mean Hoyer sparsity {stats['mean']:.3f} over {stats['positions']} positions")


def _train_and_summarize(args, variants) -> dict[str, dict[str, Any]]:
    config = cli.override_config(training.config_from_file(args.config), args.set)
    workdirs = train_variants(config, variants, args.root, start_over=args.start_over)
    return {name: summarize_run(workdir) for name, workdir in workdirs.items()}


def _command_train_iterations(args) -> None:
    summaries = _train_and_summarize(args, {f"iterations{n}": {"nmf.iterations": n} for n in args.values})
    root = pathlib.Path(args.root)
    _report(
        _write_json({"iterations": args.values, "runs": summaries}, root / "train_iterations.json"),
        plot_final_accuracy(
            args.values, list(summaries.values()), root / "train_iterations.png", "iterations N in training"
        ),
        plots.plot_learning_curves([s["workdir"] for s in summaries.values()], root / "train_iterations_curves.png"),
    )


def _command_train_gradients(args) -> None:
    summaries = _train_and_summarize(args, {mode: {"nmf.gradient": mode} for mode in args.modes})
    root = pathlib.Path(args.root)
    _report(
        _write_json({"modes": args.modes, "runs": summaries}, root / "train_gradients.json"),
        plots.plot_learning_curves([s["workdir"] for s in summaries.values()], root / "train_gradients.png"),
    )
    for mode, summary in summaries.items():
        print(f"{mode}: test accuracy {100 * summary['final_test_accuracy']:.2f}% in {summary['seconds']:.0f} s")


def _command_sweep(args) -> None:
    config = training.config_from_file(args.config)
    if config.model != "cnmf_1x1":
        raise ConfigError(f"the sweep varies NMF and 1x1 parameters: use a cnmf_1x1 config, got model {config.model!r}.")
    channels = data.check_dataset(config.dataset).channels
    variants = sweep_variants(config.features, channels, args.widths, args.nmf_groups, args.mix_groups)
    summaries = _train_and_summarize(args, variants)
    for name, overrides in variants.items():
        summaries[name].update(width=overrides["width"], groups=overrides["groups"], mix_groups=overrides["mix_groups"])
    root = pathlib.Path(args.root)
    _report(_write_json({"runs": summaries}, root / "sweep.json"), plot_sweep(summaries, root / "sweep.png"))
    print(
        "| variant | parameters | NMF | CNN (1x1) | CNN/NMF | test accuracy | seconds |\n|---|---|---|---|---|---|---|"
    )
    for name, s in sorted(summaries.items(), key=lambda item: item[1]["parameters"]):
        ratio = s["cnn_parameters"] / s["nmf_parameters"]
        print(
            f"| {name} | {s['parameters']:,} | {s['nmf_parameters']:,} | {s['cnn_parameters']:,} | {ratio:.2f} | {100 * s['final_test_accuracy']:.2f}% | {s['seconds']:.0f} |"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m nmfjax.experiments", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def on_workdirs(name, function, help_text, workdirs=1):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("workdirs", nargs=workdirs, metavar="WORKDIR", help="workdir(s) written by train.py")
        command.add_argument("--output", help="output directory (default: WORKDIR/experiments)")
        command.add_argument("--step", default="best", type=_step, help='checkpoint: "best" (default), "latest" or an epoch')
        command.add_argument("--data_dir", help="TFDS data directory (default: the workdir's config.data_dir)")
        command.add_argument("--limit", type=cli.positive_int, help="use only the first LIMIT test images")
        command.set_defaults(function=function)
        return command

    noise = on_workdirs("noise", _command_noise, "test accuracy under uniform noise and holes (SPEC section 5)", "+")
    noise.add_argument("--kinds", nargs="+", default=list(NOISE_KINDS), choices=NOISE_KINDS)
    noise.add_argument("--levels", nargs="+", type=float, default=list(NOISE_LEVELS), help="noise levels eta")
    noise.add_argument("--seed", type=int, default=0)
    iterations = on_workdirs("iterations", _command_iterations, "test accuracy when evaluated with other N")
    iterations.add_argument("--values", nargs="+", type=cli.positive_int, default=[1, 2, 5, 10, 20, 50, 100])
    gradients = on_workdirs(
        "gradients", _command_gradients, "approx and implicit weight gradients against unrolled, per layer", "*"
    )
    gradients.add_argument("--config", help="instead of WORKDIR: a config file, for the network at its initialisation")
    gradients.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override, with --config")
    gradients.add_argument("--values", nargs="+", type=cli.positive_int, default=[5, 20, 50], help="iterations N")
    gradients.add_argument("--modes", nargs="+", default=["approx", "implicit"], choices=("approx", "implicit"))
    gradients.add_argument("--batch", type=cli.positive_int, default=50, help="test images in the loss (default 50)")
    on_workdirs("weights", _command_weights, "the first layer's weights as a grid of colour patches")
    reconstructions = on_workdirs(
        "reconstructions", _command_reconstructions, "test images rebuilt from the first NMF layer's h"
    )
    reconstructions.add_argument("--count", type=cli.positive_int, default=8, help="how many test images (default 8)")
    sparsity = on_workdirs("sparsity", _command_sparsity, "histograms of the Hoyer sparsity of h per NMF layer")
    sparsity.add_argument("--batch", type=cli.positive_int, default=200, help="test images (default 200)")

    def trainings(name, function, help_text):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--config", required=True, help="config file, e.g. configs/cnmf_1x1.py")
        command.add_argument("--root", required=True, help="one workdir per variant goes here")
        command.add_argument(
            "--set", action="append", default=[], metavar="FIELD=VALUE", help="config override, repeatable"
        )
        command.add_argument(
            "--start_over", action="store_true", help="move each variant's previous run aside and train it again"
        )
        command.set_defaults(function=function)
        return command

    train_iterations = trainings("train-iterations", _command_train_iterations, "short trainings at several N")
    train_iterations.add_argument("--values", nargs="+", type=cli.positive_int, default=[5, 10, 20, 50])
    train_gradients = trainings("train-gradients", _command_train_gradients, "short trainings with each gradient mode")
    train_gradients.add_argument("--modes", nargs="+", default=list(GRADIENT_MODES), choices=GRADIENT_MODES)
    sweep = trainings("sweep", _command_sweep, "width x groups sweep with the paper's Figure 6")
    sweep.add_argument("--widths", nargs="+", type=cli.positive_int, default=list(SWEEP_WIDTHS))
    sweep.add_argument("--nmf_groups", nargs="+", type=cli.positive_int, default=list(SWEEP_GROUPS))
    sweep.add_argument("--mix_groups", nargs="+", type=cli.positive_int, default=list(SWEEP_GROUPS))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with cli.exit_on_errors():
        args.function(args)


if __name__ == "__main__":
    main()
