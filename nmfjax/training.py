"""Training and evaluation of the paper's networks (SPEC section 4).

``train_and_evaluate(config, workdir)`` runs the whole recipe: the composite
CE + MSE loss on the softmax output, Adam with one learning rate per parameter
group, the reduce-on-plateau rule after each epoch, orbax checkpoints every
epoch (resumed automatically), ``metrics.jsonl`` and TensorBoard events in the
workdir. The train step runs data-parallel over every visible device: a 1-D
mesh over the batch, parameters replicated.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import optax.contrib
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from nmfjax import data, models

PLATEAU_METRICS = ("train_loss", "test_loss")
LEARNING_RATE_GROUPS = ("module_a", "mixing", "batch_norm")
_CE_WEIGHT, _MSE_WEIGHT = 1.0, 0.5


# --- configuration ---


def network_spec(config: ml_collections.ConfigDict) -> models.NetworkSpec:
    """The model part of a config as a validated :class:`~nmfjax.models.NetworkSpec`."""
    info = data.check_dataset(config.dataset)
    crop = config.crop_size or info.crop_size
    return models.NetworkSpec(
        architecture=config.model,
        input_shape=(crop, crop, info.channels),
        kernel_sizes=tuple(config.kernel_sizes),
        features=tuple(config.features),
        pooling=tuple(config.pooling),
        batch_norm=tuple(config.batch_norm),
        groups=tuple(config.groups),
        mix_groups=tuple(config.mix_groups),
        width=config.width,
        batch_norm_statistics=config.batch_norm_statistics,
        iterations=config.nmf.iterations,
        epsilon=config.nmf.epsilon,
        gradient=config.nmf.gradient,
        learning=config.nmf.learning,
        readout_learning=config.nmf.get("readout_learning"),  # absent from configs saved before it existed
        adjoint_iterations=config.nmf.adjoint_iterations,
    )


def _check_positive(name: str, value, kind=(int,)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise ValueError(f"config.{name} must be positive, got {value!r}.")


def validate_config(config: ml_collections.ConfigDict) -> models.NetworkSpec:
    """Checks every field before any work starts; errors name the field.

    Returns:
      The network spec of the config.
    """
    spec = network_spec(config)
    info = data.DATASETS[config.dataset]
    if spec.input_shape[0] > info.image_size:
        raise ValueError(f"config.crop_size={spec.input_shape[0]} exceeds the {info.image_size}px images of {config.dataset}.")
    for name in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps", "checkpoints_to_keep"):
        _check_positive(name, config[name])
    if config.num_train_examples is not None:
        _check_positive("num_train_examples", config.num_train_examples)
    for group in LEARNING_RATE_GROUPS:
        _check_positive(f"learning_rates.{group}", config.learning_rates[group], (int, float))
    _check_positive("min_learning_rate", config.min_learning_rate, (int, float))
    if config.plateau.metric not in PLATEAU_METRICS:
        raise ValueError(f"config.plateau.metric must be one of {PLATEAU_METRICS}, got {config.plateau.metric!r}.")
    if not 0 < config.plateau.factor < 1:
        raise ValueError(f"config.plateau.factor must lie in (0, 1), got {config.plateau.factor}.")
    _check_positive("plateau.patience", config.plateau.patience)
    devices = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % devices:
            raise ValueError(
                f"config.{name}={config[name]} must be divisible by the {devices} devices the batch is split over."
            )
    return spec


# --- loss, optimiser, state ---


def composite_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """SPEC's loss per example: ``(1.0 * CE(y, p) + 0.5 * sum_c (p_c - y_c)^2) / 1.5``.

    Args:
      logits: ``(B, classes)``; ``p = softmax(logits)`` is the network's output.
      labels: ``(B,)`` integer classes.

    Returns:
      ``(B,)`` losses.
    """
    log_probabilities = jax.nn.log_softmax(logits)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    cross_entropy = -jnp.sum(targets * log_probabilities, axis=-1)
    squared_error = jnp.sum((jnp.exp(log_probabilities) - targets) ** 2, axis=-1)
    return (_CE_WEIGHT * cross_entropy + _MSE_WEIGHT * squared_error) / (_CE_WEIGHT + _MSE_WEIGHT)


def summed_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """A batch's summed loss, correct predictions and example count (add batches, then divide)."""
    return {
        "loss": jnp.sum(composite_loss(logits, labels)),
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
        "count": labels.shape[0],
    }


def make_optimizer(config: ml_collections.ConfigDict, params: nnx.State) -> optax.GradientTransformation:
    """Adam (PyTorch defaults) with one learning rate per group (SPEC section 4):
    module-a weights, 1x1 convolutions and BatchNorm; see :func:`models.parameter_group`."""
    labels = jax.tree_util.tree_map_with_path(lambda path, _: models.parameter_group(path), params)
    transforms = {group: optax.adam(config.learning_rates[group]) for group in LEARNING_RATE_GROUPS}
    return optax.multi_transform(transforms, labels)


def make_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    # PyTorch's ReduceLROnPlateau reduces after more than `patience` bad epochs,
    # optax's after exactly `patience`: shift by one to match the authors' code.
    return optax.contrib.reduce_on_plateau(
        factor=config.plateau.factor, patience=config.plateau.patience + 1, rtol=config.plateau.rtol, atol=0.0
    )


@flax.struct.dataclass
class TrainState:
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    plateau: optax.contrib.ReduceLROnPlateauState


def learning_rates(config: ml_collections.ConfigDict, state: TrainState) -> dict[str, float]:
    scale = float(state.plateau.scale)
    return {group: config.learning_rates[group] * scale for group in LEARNING_RATE_GROUPS}


# --- the trainer ---


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """The 1-D mesh the batch is split over: every visible device (or ``devices``)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


class Trainer:
    """The jitted train and eval steps of one config, sharded over a mesh of all devices."""

    def __init__(self, config: ml_collections.ConfigDict, spec: models.NetworkSpec, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharded = NamedSharding(mesh, P("data"))
        model = models.Network(spec, rngs=nnx.Rngs(config.seed))
        self.graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        model.eval()
        self.eval_graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
        self.tx = make_optimizer(config, params)
        self.plateau_tx = make_plateau(config)
        self.crop_size = spec.input_shape[0]
        state = TrainState(
            params=params,
            batch_stats=batch_stats,
            opt_state=self.tx.init(params),
            plateau=self.plateau_tx.init(jnp.zeros((), jnp.float32)),
        )
        self.initial_state = jax.device_put(state, self.replicated)
        self.train_step = jax.jit(self._train_step_impl, donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step_impl)
        self._plateau_step = jax.jit(self._plateau_step_impl)

    def put_replicated(self, array: np.ndarray) -> jax.Array:
        """A host array replicated on every device (multi-host too)."""
        return jax.make_array_from_callback(array.shape, self.replicated, lambda index: array[index])

    def _train_step_impl(self, state: TrainState, images, labels, batch_indices, key):
        batch_indices = jax.lax.with_sharding_constraint(batch_indices, self.batch_sharded)
        inputs = data.augment(key, images[batch_indices], self.crop_size, self.config.augment)
        targets = labels[batch_indices]

        def loss_fn(params):
            # Fresh BatchStat variables of this trace, which BatchNorm may update.
            batch_stats = jax.tree.map(jnp.asarray, state.batch_stats)
            model = nnx.merge(self.graphdef, params, batch_stats)
            logits = model.logits(inputs)
            return jnp.mean(composite_loss(logits, targets)), (logits, nnx.state(model, nnx.BatchStat))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        # Adam's step is linear in the learning rate, so scaling it scales every group's rate.
        updates = jax.tree.map(lambda update: update * state.plateau.scale, updates)
        state = state.replace(
            params=optax.apply_updates(state.params, updates), batch_stats=batch_stats, opt_state=opt_state
        )
        metrics = {
            "loss": loss * targets.shape[0],
            "correct": jnp.sum(jnp.argmax(logits, -1) == targets),
            "count": targets.shape[0],
        }
        return state, metrics

    def _eval_step_impl(self, state: TrainState, images, labels, batch_indices):
        if batch_indices.shape[0] % self.mesh.size == 0:
            batch_indices = jax.lax.with_sharding_constraint(batch_indices, self.batch_sharded)
        inputs = data.center_crop(images[batch_indices], self.crop_size)
        targets = labels[batch_indices]
        model = nnx.merge(self.eval_graphdef, state.params, state.batch_stats)
        return summed_metrics(model.logits(inputs), targets)

    def _plateau_step_impl(self, plateau, value):
        _, plateau = self.plateau_tx.update(updates=(), state=plateau, value=value)
        return plateau

    def update_plateau(self, state: TrainState, value: float) -> TrainState:
        return state.replace(plateau=self._plateau_step(state.plateau, jnp.float32(value)))

    def epoch_permutation(self, epoch: int, num_examples: int) -> np.ndarray:
        """The epoch's shuffled batches ``(steps, batch)``, the same on every host; the remainder is dropped."""
        rng = np.random.default_rng((self.config.seed, epoch))
        steps = num_examples // self.config.batch_size
        return rng.permutation(num_examples)[: steps * self.config.batch_size].reshape(steps, -1).astype(np.int32)

    def step_key(self, epoch: int, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), epoch), step)

    def compile(self, state, train_images, train_labels, test_images, test_labels) -> float:
        """Compiles the steps ahead of time; returns the seconds it took."""
        start = time.perf_counter()
        batch = jax.ShapeDtypeStruct((self.config.batch_size,), jnp.int32)
        eval_batch = jax.ShapeDtypeStruct((self.config.eval_batch_size,), jnp.int32)
        self.train_step.lower(state, train_images, train_labels, batch, self.step_key(0, 0)).compile()
        self.eval_step.lower(state, test_images, test_labels, eval_batch).compile()
        return time.perf_counter() - start

    def train_epoch(self, state, epoch, images, labels, progress: bool) -> tuple[TrainState, dict[str, float]]:
        permutation = self.epoch_permutation(epoch, labels.shape[0])
        totals = None
        bar = tqdm(range(len(permutation)), desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress)
        start = time.perf_counter()
        for step in bar:
            state, metrics = self.train_step(state, images, labels, permutation[step], self.step_key(epoch, step))
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
            if progress and (step + 1) % self.config.log_every_steps == 0:
                seen = jax.device_get(totals)
                bar.set_postfix(
                    loss=f"{seen['loss'] / seen['count']:.4f}",
                    acc=f"{100 * seen['correct'] / seen['count']:.1f}%",
                    img_s=f"{seen['count'] / (time.perf_counter() - start):.0f}",
                )
        totals = jax.device_get(totals)
        seconds = time.perf_counter() - start
        return state, {
            "train_loss": float(totals["loss"] / totals["count"]),
            "train_loss_sum": float(totals["loss"]),
            "train_accuracy": float(totals["correct"] / totals["count"]),
            "train_seconds": seconds,
            "train_images_per_second": float(totals["count"] / seconds),
        }

    def evaluate(self, state, images, labels) -> dict[str, float]:
        num_examples = labels.shape[0]
        indices = np.arange(num_examples, dtype=np.int32)
        size = self.config.eval_batch_size
        batches = [indices[i : i + size] for i in range(0, num_examples, size)]
        start = time.perf_counter()
        totals = None
        for batch in batches:
            metrics = self.eval_step(state, images, labels, batch)
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
        totals = jax.device_get(totals)
        seconds = time.perf_counter() - start
        return {
            "test_loss": float(totals["loss"] / totals["count"]),
            "test_accuracy": float(totals["correct"] / totals["count"]),
            "eval_seconds": seconds,
            "eval_images_per_second": float(totals["count"] / seconds),
        }


# --- workdir: checkpoints, metrics, TensorBoard ---


def _checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
    policies = ocp.checkpoint_managers.preservation_policy
    keep = policies.AnyPreservationPolicy(
        [
            policies.LatestN(n=config.checkpoints_to_keep),
            policies.BestN(get_metric_fn=lambda metrics: metrics["test_accuracy"], reverse=False, n=1),
        ]
    )
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(preservation_policy=keep, create=True),
    )


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a workdir's ``metrics.jsonl``, one per epoch."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep_metrics_until(workdir: pathlib.Path, epoch: int) -> None:
    """Drops rows written after the checkpoint a run resumes from."""
    rows = [row for row in read_metrics(workdir) if row["epoch"] <= epoch]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _format_epoch(row: dict[str, Any], num_epochs: int) -> str:
    return (
        f"epoch {row['epoch']:>3}/{num_epochs}  "
        f"train loss {row['train_loss']:.4f} acc {100 * row['train_accuracy']:5.2f}%  "
        f"test loss {row['test_loss']:.4f} acc {100 * row['test_accuracy']:5.2f}%  "
        f"lr {row['learning_rate_module_a']:.1e}  "
        f"{row['train_images_per_second']:.0f} img/s train, {row['eval_images_per_second']:.0f} img/s eval  "
        f"{row['epoch_seconds']:.1f} s"
    )


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its ``config.json``)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a workdir written by train.py?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def config_from_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file such as ``configs/cnmf_1x1.py``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (e.g. configs/cnmf_1x1.py).")
    module_spec = importlib.util.spec_from_file_location(f"nmfjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted fields replaced, e.g. ``{"nmf.iterations": 5, "width": 2}``."""
    config = ml_collections.ConfigDict(config.to_dict())
    for name, value in overrides.items():
        *parents, leaf = name.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        if leaf not in target:
            raise KeyError(f"config has no field {name!r}.")
        target[leaf] = value
    return config


def load_checkpoint(
    workdir: str | pathlib.Path, step: int | str | None = None
) -> tuple[ml_collections.ConfigDict, models.Network, TrainState, int]:
    """Restores a trained network from a workdir.

    Args:
      workdir: a directory written by :func:`train_and_evaluate`.
      step: an epoch, ``"best"`` (highest test accuracy), or ``"latest"`` / ``None``.

    Returns:
      ``(config, model, state, epoch)``: the model carries the checkpoint's
      parameters and BatchNorm statistics.
    """
    if isinstance(step, str) and step not in ("best", "latest"):
        raise ValueError(f'step must be an epoch, "best", "latest" or None, got {step!r}.')
    workdir = pathlib.Path(workdir)
    config = load_config(workdir)
    spec = network_spec(config)
    trainer = Trainer(config, spec, data_mesh())
    manager = _checkpoint_manager(workdir, config)
    try:
        if step == "best":
            kept = set(manager.all_steps())
            rows = [row for row in read_metrics(workdir) if row["epoch"] in kept]
            epoch = max(rows, key=lambda row: row["test_accuracy"])["epoch"] if rows else None
        else:
            epoch = manager.latest_step() if step in (None, "latest") else step
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}.")
        restored = manager.restore(
            epoch,
            args=ocp.args.StandardRestore(_abstract({"state": trainer.initial_state, "epoch": 0, "seed": 0})),
        )
    finally:
        manager.close()
    state = restored["state"]
    model = nnx.merge(trainer.graphdef, state.params, state.batch_stats)
    return config, model, state, int(epoch)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains ``config``'s network, resuming from the workdir's latest checkpoint.

    Writes to ``workdir``: ``config.json``, ``checkpoints/`` (orbax, every epoch:
    the latest ``config.checkpoints_to_keep`` and the best by test accuracy),
    ``metrics.jsonl`` (one JSON object per epoch) and ``tensorboard/``.

    Returns:
      The last epoch's metrics row (empty if no epoch was left to run).
    """
    spec = validate_config(config)
    workdir = pathlib.Path(workdir)
    is_main_process = jax.process_index() == 0
    if is_main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    train = data.load_split(
        config.dataset, "train", data_dir=config.data_dir, download=config.download, limit=config.num_train_examples
    )
    test = data.load_split(config.dataset, "test", data_dir=config.data_dir, download=config.download)

    trainer = Trainer(config, spec, data_mesh())
    train_images, train_labels = trainer.put_replicated(train.images), trainer.put_replicated(train.labels)
    test_images, test_labels = trainer.put_replicated(test.images), trainer.put_replicated(test.labels)

    manager = _checkpoint_manager(workdir, config)
    state, first_epoch = trainer.initial_state, 1
    if manager.latest_step() is not None:
        restored = manager.restore(
            manager.latest_step(),
            args=ocp.args.StandardRestore(_abstract({"state": state, "epoch": 0, "seed": config.seed})),
        )
        state, first_epoch = restored["state"], int(restored["epoch"]) + 1
        if is_main_process:
            _keep_metrics_until(workdir, first_epoch - 1)
            print(f"Resumed from {workdir / 'checkpoints'} after epoch {first_epoch - 1}.")

    compile_seconds = trainer.compile(state, train_images, train_labels, test_images, test_labels)
    if is_main_process:
        parameters = sum(leaf.size for leaf in jax.tree.leaves(state.params))
        print(
            f"{config.model}: {parameters:,} parameters, "
            f"{len(train)} train / {len(test)} test images, {jax.device_count()} device(s), "
            f"compiled in {compile_seconds:.1f} s."
        )

    writer = None
    if is_main_process:
        from tensorboardX import SummaryWriter  # TensorFlow-free event writer

        writer = SummaryWriter(str(workdir / "tensorboard"))
    row: dict[str, Any] = {}
    max_rate = max(config.learning_rates[group] for group in LEARNING_RATE_GROUPS)
    try:
        for epoch in range(first_epoch, config.num_epochs + 1):
            if max_rate * float(state.plateau.scale) < config.min_learning_rate:
                print(f"Every learning rate is below {config.min_learning_rate}: stopping.")
                break
            epoch_start = time.perf_counter()
            rates = learning_rates(config, state)
            state, train_metrics = trainer.train_epoch(state, epoch, train_images, train_labels, is_main_process)
            if not math.isfinite(train_metrics["train_loss"]):
                raise FloatingPointError(
                    f"epoch {epoch}: the training loss is {train_metrics['train_loss']}; nothing of this epoch was "
                    f"saved (the latest checkpoint in {workdir / 'checkpoints'} is still finite). Lower "
                    "config.learning_rates, or use config.nmf.gradient='approx', and rerun to resume."
                )
            test_metrics = trainer.evaluate(state, test_images, test_labels)
            state = trainer.update_plateau(state, {**train_metrics, **test_metrics}[config.plateau.metric])
            row = {
                "epoch": epoch,
                **train_metrics,
                **test_metrics,
                **{f"learning_rate_{group}": rate for group, rate in rates.items()},
                "compile_seconds": compile_seconds,
                "epoch_seconds": time.perf_counter() - epoch_start,
            }
            manager.save(
                epoch,
                args=ocp.args.StandardSave({"state": state, "epoch": epoch, "seed": config.seed}),
                metrics={"test_accuracy": row["test_accuracy"]},
            )
            if is_main_process:
                with open(workdir / "metrics.jsonl", "a") as metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                for name, value in row.items():
                    if name != "epoch" and isinstance(value, float) and math.isfinite(value):
                        writer.add_scalar(name, value, epoch)
                writer.flush()
                print(_format_epoch(row, config.num_epochs), flush=True)
    finally:
        manager.wait_until_finished()
        manager.close()
        if writer is not None:
            writer.close()
    return row
