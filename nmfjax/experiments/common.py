"""What every analysis needs: a trained network from a workdir, its test images, and its evaluation."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import ml_collections
from flax import nnx

from nmfjax import checkpoints, configuration, data, evaluation, models, parallel
from nmfjax.outputs import write_output


@dataclasses.dataclass
class Trained:
    """A network restored from a workdir."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    model: models.Network
    epoch: int

    @property
    def label(self) -> str:
        """How plots and tables name the network: its architecture and epoch."""
        if self.epoch == 0:
            return f"{self.config.model.architecture} at initialisation"
        return f"{self.workdir.name} ({self.config.model.architecture}, epoch {self.epoch})"


def load_trained(
    workdir: str | pathlib.Path, step: int | str | None = None, *, batch_norm_statistics: str | None = None
) -> Trained:
    """The network of a workdir at ``step``: an epoch, ``"best"`` or ``"latest"``; by default
    (``None``) the best epoch of a workdir, and the one epoch an exported network holds.
    ``batch_norm_statistics`` is as for :func:`nmfjax.checkpoints.load_checkpoint`.
    """
    if step is None and not checkpoints.is_exported_network(workdir):
        step = "best"
    config, model, _, epoch = checkpoints.load_checkpoint(workdir, step, batch_norm_statistics=batch_norm_statistics)
    return Trained(pathlib.Path(workdir), config, model, epoch)


def initialised(config: ml_collections.ConfigDict, label: str) -> Trained:
    """A config's network at its initialisation (epoch 0), as training starts it."""
    network = models.build(configuration.network_spec(config), config.seed)
    return Trained(pathlib.Path(label), config, network, epoch=0)


def with_nmf_options(model: models.Network, **changes) -> models.Network:
    """The same network and weights with other NMF options (fields of :class:`~nmfjax.ops.NMFOptions`),
    e.g. ``iterations=50`` or ``gradient="unrolled"``.
    """
    spec = dataclasses.replace(model.spec, nmf=model.spec.nmf.replace(**changes))
    network = models.build(spec, 0)
    nnx.update(network, nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))
    return network


def in_evaluation_mode(model: models.Network) -> models.Network:
    """A copy in evaluation mode (BatchNorm with running statistics uses them); ``model`` is left as it is."""
    model = nnx.clone(model)
    model.eval()
    return model


def load_test_split(config: ml_collections.ConfigDict, data_dir: str | None, limit: int | None) -> data.Split:
    """The test split of a run's dataset (from ``data_dir``, else the run's own), first ``limit`` images."""
    return data.load_split(
        config.dataset,
        "test",
        data_dir=data_dir or config.data_dir,
        download=config.download,
        limit=limit,
        image_size=config.image_size,
    )


def evaluator(model: models.Network, split: data.Split, *, batch_size: int) -> Callable[..., dict[str, float]]:
    """``evaluate(preprocess=None, arguments=())``: test loss and accuracy of ``model`` (in evaluation
    mode) on ``split``, centre-cropped as in training, through :class:`nmfjax.evaluation.Evaluator`.

    The split is put on the devices once and the evaluation compiled once per
    ``preprocess``; ``arguments`` may change between calls at no cost.
    """
    graphdef, params, batch_stats = models.split_state(in_evaluation_mode(model))
    mesh = parallel.data_mesh()
    images, labels = parallel.put_replicated(mesh, split.images), parallel.put_replicated(mesh, split.labels)
    runner = evaluation.Evaluator(graphdef, model.spec.input_shape[0], batch_size, mesh)

    def evaluate(preprocess: evaluation.Preprocess | None = None, arguments: tuple = ()) -> dict[str, float]:
        return runner.evaluate(params, batch_stats, images, labels, preprocess=preprocess, arguments=arguments)

    return evaluate


def write_json(payload: Any, output: pathlib.Path) -> pathlib.Path:
    """Writes an analysis's results as indented JSON (atomically, creating the folder); returns the path."""
    return write_output(output, json.dumps(payload, indent=2) + "\n")
