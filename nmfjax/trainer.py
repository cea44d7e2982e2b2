"""The training step of the paper's networks (arXiv 2503.20398, section 2.6, and the authors' code):
Adam with one learning rate per parameter group, the reduce-on-plateau rule, the state a
checkpoint holds, and :class:`Trainer` with the jitted train and eval steps over a mesh.

The loss is the composite CE + MSE on the softmax output (paper eq. 21,
:mod:`nmfjax.evaluation`); a run of many epochs in a workdir is
:func:`nmfjax.training.train_and_evaluate`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import optax.contrib
from flax import nnx
from tqdm.auto import tqdm

from nmfjax import configuration, data, evaluation, models, parallel
from nmfjax.evaluation import Metrics

# --- loss, optimiser, state ---


def make_optimizer(config: ml_collections.ConfigDict, params: nnx.State) -> optax.GradientTransformation:
    """Adam (PyTorch defaults) with one learning rate per parameter group: module a's weights,
    the 1x1 mixing convolutions and BatchNorm (``config.learning_rates``), chosen by variable
    type (:func:`nmfjax.models.parameter_group`).
    """
    is_variable = lambda value: isinstance(value, nnx.Variable)  # noqa: E731
    # A label for each array, in the structure of ``params``.
    labels = jax.tree.map(
        lambda variable: jax.tree.map(lambda _: models.parameter_group(variable), variable), params, is_leaf=is_variable
    )
    transforms = {group: optax.adam(config.learning_rates[group]) for group in models.PARAMETER_GROUPS}
    return optax.multi_transform(transforms, labels)


def make_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """The learning-rate scale: ``config.plateau``'s reduce-on-plateau rule, as PyTorch's ReduceLROnPlateau."""
    # PyTorch's ReduceLROnPlateau reduces after more than `patience` bad epochs,
    # optax's after exactly `patience`: shift by one to match the authors' code.
    return optax.contrib.reduce_on_plateau(
        factor=config.plateau.factor, patience=config.plateau.patience + 1, rtol=config.plateau.rtol, atol=0.0
    )


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds of a run: parameters, BatchNorm statistics and optimiser states."""

    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    plateau: optax.contrib.ReduceLROnPlateauState


def initial_state(config: ml_collections.ConfigDict, model: models.Network, mesh: jax.sharding.Mesh) -> TrainState:
    """The state a new run starts from, replicated over ``mesh``: ``model``'s parameters and BatchNorm
    statistics, and fresh optimiser and plateau states.
    """
    _, params, batch_stats = models.split_state(model)
    state = TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=make_optimizer(config, params).init(params),
        plateau=make_plateau(config).init(jnp.zeros((), jnp.float32)),
    )
    return jax.device_put(state, parallel.replicated(mesh))


def learning_rates(config: ml_collections.ConfigDict, state: TrainState) -> dict[str, float]:
    """Each parameter group's learning rate now: its ``config.learning_rates`` entry times the plateau scale."""
    scale = float(state.plateau.scale)
    return {group: config.learning_rates[group] * scale for group in models.PARAMETER_GROUPS}


# --- the trainer ---


def steps_per_call(config: ml_collections.ConfigDict) -> int:
    """``config.steps_per_call``, or when it is None the default of the platform: 1 on a CPU (where a
    step's own time dwarfs the call's) and 10 on an accelerator (where the host loop would cost ~18 %).
    """
    if config.get("steps_per_call") is not None:
        return config.steps_per_call
    return 1 if jax.default_backend() == "cpu" else 10


class Trainer:
    """The jitted train step of one config and the evaluator of its network, over a mesh."""

    def __init__(self, config: ml_collections.ConfigDict, spec: models.NetworkSpec, mesh: jax.sharding.Mesh):
        self.config = configuration.with_data_defaults(config)  # augment.flip None: the data's default
        self.mesh = mesh
        model = models.build(spec, config.seed)
        self.graphdef, params, _ = models.split_state(model)
        self.initial_state = initial_state(config, model, mesh)
        self.tx = make_optimizer(config, params)
        self.plateau_tx = make_plateau(config)
        model.eval()
        eval_graphdef, _, _ = models.split_state(model)
        self.crop_size = spec.input_shape[0]
        self.evaluator = evaluation.Evaluator(eval_graphdef, self.crop_size, config.eval_batch_size, mesh)
        self.one_program_at_a_time = parallel.one_program_at_a_time(mesh)
        self.train_step = jax.jit(self._train_step_impl, donate_argnums=0)
        self.train_steps = jax.jit(self._train_steps_impl, donate_argnums=0)
        # The calls compile() made ahead of time, by (images' shape, steps): the epochs run these, so that
        # a program the persistent cache does not keep (one with the CPU kernel's call) compiles once.
        self._compiled_train_steps: dict[tuple, Any] = {}
        self.steps_per_call = steps_per_call(config)
        self._plateau_step = jax.jit(self._plateau_step_impl)
        self._step_keys = jax.jit(jax.vmap(self.step_key, in_axes=(None, 0)))

    def put_replicated(self, array: np.ndarray) -> jax.Array:
        """A host array replicated on every device of the mesh (multi-host too)."""
        return parallel.put_replicated(self.mesh, array)

    def _train_step_impl(
        self,
        state: TrainState,
        images: jax.Array,
        labels: jax.Array,
        batch_indices: jax.Array,
        key: jax.Array,
        totals: Metrics,
    ) -> tuple[TrainState, Metrics]:
        """One Adam step on a batch; returns the new state and ``totals`` plus the batch's metric sums."""
        batch_indices = parallel.split_batch(batch_indices, self.mesh)
        inputs = data.augment(key, images[batch_indices], self.crop_size, self.config.augment)
        targets = labels[batch_indices]
        loss_fn = lambda params: evaluation.batch_loss(self.graphdef, params, state.batch_stats, inputs, targets)  # noqa: E731
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        # Adam's step is linear in the learning rate, so scaling it scales every group's rate.
        updates = jax.tree.map(lambda update: update * state.plateau.scale, updates)
        state = dataclasses.replace(
            state, params=optax.apply_updates(state.params, updates), batch_stats=batch_stats, opt_state=opt_state
        )
        return state, evaluation.add_metrics(totals, evaluation.summed_metrics(logits, targets, loss))

    def _train_steps_impl(
        self,
        state: TrainState,
        images: jax.Array,
        labels: jax.Array,
        batches: jax.Array,
        keys: jax.Array,
        totals: Metrics,
    ) -> tuple[TrainState, Metrics]:
        """``len(batches)`` train steps in one call: a scan over the rows of ``batches`` ``(K, batch)``
        and their augmentation keys ``keys`` ``(K,)`` (:meth:`step_key`).
        """

        def step(
            carry: tuple[TrainState, Metrics], batch: tuple[jax.Array, jax.Array]
        ) -> tuple[tuple[TrainState, Metrics], None]:
            (state, totals), (indices, key) = carry, batch
            return self._train_step_impl(state, images, labels, indices, key, totals), None

        (state, totals), _ = jax.lax.scan(step, (state, totals), (batches, keys))
        return state, totals

    def _plateau_step_impl(
        self, plateau: optax.contrib.ReduceLROnPlateauState, value: jax.Array
    ) -> optax.contrib.ReduceLROnPlateauState:
        _, plateau = self.plateau_tx.update(updates=(), state=plateau, value=value)
        return plateau

    def update_plateau(self, state: TrainState, value: float) -> TrainState:
        """The plateau rule after an epoch whose monitored metric was ``value``."""
        return dataclasses.replace(state, plateau=self._plateau_step(state.plateau, jnp.float32(value)))

    def epoch_permutation(self, epoch: int, num_examples: int) -> np.ndarray:
        """The epoch's shuffled batches ``(steps, batch)``, the same on every host; the remainder is dropped."""
        rng = np.random.default_rng((self.config.seed, epoch))
        steps = num_examples // self.config.batch_size
        return rng.permutation(num_examples)[: steps * self.config.batch_size].reshape(steps, -1).astype(np.int32)

    def step_key(self, epoch: int | jax.Array, step: int | jax.Array) -> jax.Array:
        """The augmentation key of one step: a function of the seed, the epoch and the step only."""
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), epoch), step)

    def step_keys(self, epoch: int, steps: range) -> jax.Array:
        """The :meth:`step_key` of each of ``steps`` of ``epoch``, stacked (one call's), in one dispatch."""
        return self._step_keys(np.int32(epoch), np.arange(steps.start, steps.stop, dtype=np.int32))

    def compile(
        self,
        state: TrainState,
        train_images: jax.Array,
        train_labels: jax.Array,
        test_images: jax.Array,
        test_labels: jax.Array,
    ) -> float:
        """Compiles the steps ahead of time; returns the seconds it took."""
        start = time.perf_counter()
        totals = evaluation.no_metrics(self.mesh)
        steps_per_epoch = train_labels.shape[0] // self.config.batch_size
        # One program per length of call an epoch has: K steps, and the remainder's.
        for steps in {min(self.steps_per_call, steps_per_epoch), steps_per_epoch % self.steps_per_call} - {0}:
            batches = jax.ShapeDtypeStruct((steps, self.config.batch_size), jnp.int32)
            keys = self.step_keys(0, range(steps))
            compiled = self.train_steps.lower(state, train_images, train_labels, batches, keys, totals).compile()
            self._compiled_train_steps[train_images.shape, steps] = compiled
        self.evaluator.compile(state.params, state.batch_stats, test_images, test_labels)
        return time.perf_counter() - start

    def train_epoch(
        self,
        state: TrainState,
        epoch: int,
        images: jax.Array,
        labels: jax.Array,
        progress: bool,
        check_stop: Callable[[], None] = lambda: None,
    ) -> tuple[TrainState, dict[str, float]]:
        """One epoch of train steps, :attr:`steps_per_call` per compiled call; ``check_stop`` runs after
        each call and may raise to end the epoch early.
        """
        permutation = self.epoch_permutation(epoch, labels.shape[0])
        totals = evaluation.no_metrics(self.mesh)
        bar = tqdm(total=len(permutation), desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress)
        start = time.perf_counter()
        logged = 0
        for first in range(0, len(permutation), self.steps_per_call):
            batches = permutation[first : first + self.steps_per_call]
            keys = self.step_keys(epoch, range(first, first + len(batches)))
            train_steps = self._compiled_train_steps.get((images.shape, len(batches)), self.train_steps)
            state, totals = train_steps(state, images, labels, batches, keys, totals)
            if self.one_program_at_a_time:
                jax.block_until_ready(totals)
            check_stop()
            bar.update(len(batches))
            done = first + len(batches)
            if progress and done // self.config.log_every_steps > logged:
                logged = done // self.config.log_every_steps
                seen = evaluation.mean_metrics(totals)
                bar.set_postfix(
                    loss=f"{seen['loss']:.4f}",
                    acc=f"{100 * seen['accuracy']:.1f}%",
                    img_s=f"{seen['count'] / (time.perf_counter() - start):.0f}",
                )
        bar.close()
        means = evaluation.mean_metrics(totals)
        seconds = time.perf_counter() - start
        return state, {
            "train_loss": means["loss"],
            "train_loss_sum": means["loss_sum"],
            "train_accuracy": means["accuracy"],
            "train_seconds": seconds,
            "train_images_per_second": means["count"] / seconds,
        }

    def evaluate(
        self, state: TrainState, images: jax.Array, labels: jax.Array, check_stop: Callable[[], None] = lambda: None
    ) -> dict[str, float]:
        """Test loss and accuracy over all ``images``; ``check_stop`` runs after each batch."""
        result = self.evaluator.evaluate(state.params, state.batch_stats, images, labels, check_stop=check_stop)
        return {
            "test_loss": result["loss"],
            "test_accuracy": result["accuracy"],
            "eval_seconds": result["seconds"],
            "eval_images_per_second": result["images_per_second"],
        }
