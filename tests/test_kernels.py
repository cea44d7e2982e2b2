"""The fused NMF kernel (nmfjax.kernels) against XLA's loop, on the CPU in Pallas's interpret mode:
its ``h`` for every NMF layer shape of the paper's networks and each precision, its gradients
through the op's custom VJPs, and a training step of CNMF+1x1. What a GPU runs of it is checked
by lowering for CUDA in tests/test_export.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from nmfjax import configuration, cpu_kernel, evaluation, kernels, layers, models, ops, parallel
from nmfjax import trainer as trainer_module
from tests.tiny_configs import tiny_config

# float32 round-off: the kernel sums W^T (x / R) over the features in chunks, XLA in one product,
# and the N updates carry the difference along.
H_RTOL, H_ATOL = 2e-5, 1e-7


def _nmf_layer_problems(architecture: str) -> set[tuple[int, int, int]]:
    """``(positions, S, I)`` of each NMF op call in ``architecture`` on one CIFAR-10 crop."""
    seen: set[tuple[int, int, int]] = set()
    nmf = ops.nmf

    def recording(x, w, options=None, **fields):
        seen.add((int(np.prod(x.shape[:-1])), *w.shape))
        return nmf(x, w, options, **fields)

    spec = configuration.validate_config(tiny_config(architecture))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "nmf", recording)
        models.build(spec, 0)(jnp.zeros((1, *spec.input_shape)))
    return seen


LAYER_PROBLEMS = sorted(_nmf_layer_problems("cnmf_1x1") | _nmf_layer_problems("cnmf"))


def _problem(positions: int, features: int, hidden: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    x_key, w_key = jax.random.split(jax.random.key(seed))
    x = ops.l1_normalize(jax.random.uniform(x_key, (positions, features)))
    return x, ops.positive_weights(jax.random.uniform(w_key, (features, hidden)))


def test_the_networks_have_the_layer_shapes_the_kernel_must_take():
    # Blocks 1-4 of the paper's NMF networks (S = 75 and 800 are not powers of two).
    assert sorted((s, i) for _, s, i in LAYER_PROBLEMS) == [(75, 32), (96, 10), (800, 64), (1024, 96)]


@pytest.mark.parametrize(("positions", "features", "hidden"), LAYER_PROBLEMS)
def test_the_kernels_h_equals_xlas_for_every_nmf_layer_of_the_networks(positions, features, hidden):
    x, w = _problem(positions, features, hidden)
    xla = ops.nmf(x, w, iterations=10)
    fused = ops.nmf(x, w, iterations=10, kernel="pallas")
    np.testing.assert_allclose(fused, xla, rtol=H_RTOL, atol=H_ATOL)
    np.testing.assert_allclose(jnp.sum(fused, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("epsilon", [None, 0.1])
@pytest.mark.parametrize("precision", ops.PRECISIONS)
def test_the_kernel_equals_xla_in_each_precision_and_update(precision, epsilon):
    # A shape of no power of two and fewer positions than a tile: all three are padded.
    x, w = _problem(45, 75, 20)
    xla = ops.nmf(x, w, iterations=10, epsilon=epsilon, precision=precision)
    fused = ops.nmf(x, w, iterations=10, epsilon=epsilon, precision=precision, kernel="pallas")
    # The lower precisions round the operands the same way on both paths; their sums differ as in float32.
    np.testing.assert_allclose(fused, xla, rtol=H_RTOL if precision == "float32" else 1e-3, atol=H_ATOL)


# --- the launch rule (what a GPU gets; the rule itself runs anywhere) ---

PAPER_BATCH = 50
TARGETS = {"sm_90": kernels.H100, "sm_80": kernels.A100}


def _launch_choices() -> set[tuple[kernels.LaunchParameters, int, int, str]]:
    """Every ``(parameters, S, I, precision)`` the rule picks for the networks' layers at the paper's batch."""
    return {
        (
            kernels.launch_parameters(positions * PAPER_BATCH, features, hidden, precision, target),
            features,
            hidden,
            precision,
        )
        for positions, features, hidden in LAYER_PROBLEMS
        for precision in ops.PRECISIONS
        for target in TARGETS.values()
    }


LAUNCH_CHOICES = sorted(_launch_choices(), key=repr)


def test_the_rule_fills_an_h100_with_the_largest_tile_it_can_and_gives_xla_the_layers_it_cannot():
    # Block 1 (28,800 positions): 128 per program still gives 225 programs for 132 SMs.
    first = kernels.launch_parameters(28800, 75, 32, "float32", kernels.H100)
    assert (first.position_tile, first.grid(28800)) == (128, 225) and kernels.fills_gpu(28800, first, kernels.H100)
    # Block 2 (3,200 positions): only 16 per program gives 200 >= 132 programs.
    second = kernels.launch_parameters(3200, 800, 64, "float32", kernels.H100)
    assert (second.position_tile, second.grid(3200)) == (16, 200) and kernels.fills_gpu(3200, second, kernels.H100)
    # tf32 on sm_90 keeps 64-row tiles for wgmma: 50 programs cannot fill 132 SMs, so "auto" takes XLA...
    tensor_cores = kernels.launch_parameters(3200, 800, 64, "tf32", kernels.H100)
    assert tensor_cores.position_tile == 64 and not kernels.fills_gpu(3200, tensor_cores, kernels.H100)
    # ... while an A100's mma.sync takes 16-row tiles, and 200 programs fill its 108 SMs.
    assert kernels.launch_parameters(3200, 800, 64, "tf32", kernels.A100).position_tile == 16
    # One position per image (blocks 3 and 4): no tile fills a GPU at batch 50.
    last = kernels.launch_parameters(50, 1024, 96, "float32", kernels.H100)
    assert last.position_tile == 16 and not kernels.fills_gpu(50, last, kernels.H100)


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
@pytest.mark.parametrize("precision", ops.PRECISIONS)
def test_every_choice_keeps_the_rules_bounds(precision, target):
    for positions in (1, 50, 3200, 28800, 10**6):
        for features, hidden in ((75, 32), (800, 64), (1024, 96), (96, 10), (4096, 512)):
            chosen = kernels.launch_parameters(positions, features, hidden, precision, target)
            tile, chunk = chosen.position_tile, chosen.feature_chunk
            assert tile in (16, 32, 64, 128) and (chosen.num_warps, chosen.num_stages) == (8, 1)
            if precision != "float32" and target.capability >= 90:
                assert tile >= 64  # wgmma's tiles
            padded_s, padded_i = kernels.padded_size(features), kernels.padded_size(hidden)
            assert 16 <= chunk <= min(128, padded_s) and padded_s % chunk == 0
            # Within the register budget, unless even the smallest chunk cannot be.
            values = 2 * tile * padded_i + chunk * (tile + padded_i)
            assert values <= kernels.VALUES_PER_THREAD * 32 * chosen.num_warps or chunk == 16
            # No smaller tile than the SMs need: twice the tile would leave some idle.
            if kernels.fills_gpu(positions, chosen, target) and tile < 128:
                assert -(-positions // (2 * tile)) < target.sm_count


def test_the_rule_picks_more_than_one_launch_for_the_networks():
    assert len({choice[0] for choice in LAUNCH_CHOICES}) >= 3


def _choice_id(choice: tuple[kernels.LaunchParameters, int, int, str]) -> str:
    parameters, features, hidden, precision = choice
    return f"tile{parameters.position_tile}-chunk{parameters.feature_chunk}-S{features}-I{hidden}-{precision}"


@pytest.mark.parametrize(
    ("parameters", "features", "hidden", "precision"), LAUNCH_CHOICES, ids=[_choice_id(c) for c in LAUNCH_CHOICES]
)
def test_the_kernel_equals_xla_with_every_launch_the_rule_picks(parameters, features, hidden, precision):
    # The layer's S and I, two programs of the chosen tile, the second one padded.
    positions = parameters.position_tile + 5
    x, w = _problem(positions, features, hidden)
    xla = ops.nmf(x, w, iterations=10, precision=precision)
    fused = kernels.nmf_forward(x, w, iterations=10, precision=precision, parameters=parameters, interpret=True)
    np.testing.assert_allclose(fused, xla, rtol=H_RTOL if precision == "float32" else 1e-3, atol=H_ATOL)


def test_padding_cannot_change_h():
    # An all-zero patch, the positions padded to a tile and S, I to powers of two: h is what XLA gives.
    x, w = _problem(33, 17, 5)
    x = x.at[3].set(0.0)
    for epsilon in (None, 0.5):
        fused = ops.nmf(x, w, iterations=5, epsilon=epsilon, kernel="pallas")
        np.testing.assert_allclose(fused, ops.nmf(x, w, iterations=5, epsilon=epsilon), rtol=H_RTOL, atol=H_ATOL)
    assert kernels.padded_size(17) == 32 and kernels.padded_size(5) == 16 and kernels.padded_size(64) == 64


def test_a_grouped_strided_nmf_conv_with_epsilon_equals_its_xla_twin():
    x = jax.random.uniform(jax.random.key(1), (2, 9, 9, 6))
    make = lambda kernel: layers.NMFConv(  # noqa: E731
        6, 8, 3, strides=2, feature_group_count=2, epsilon=0.2, iterations=6, kernel=kernel, rngs=nnx.Rngs(0)
    )
    np.testing.assert_allclose(make("pallas")(x), make("xla")(x), rtol=H_RTOL, atol=H_ATOL)


def test_auto_off_a_gpu_is_the_cpu_kernel_with_avx512_in_float32_and_on_bf16_units_and_xla_below():
    x, w = _problem(40, 30, 12)
    by = "cpu" if cpu_kernel.vector_bits() == kernels.AVX512_BITS else "xla"
    assert jnp.array_equal(ops.nmf(x, w, iterations=4, kernel="auto"), ops.nmf(x, w, iterations=4, kernel=by))
    bfloat16 = dict(iterations=4, precision="bfloat16")
    with ops.forcing_cpu_bfloat16("native"):
        auto = ops.nmf(x, w, kernel="auto", **bfloat16)
        by = "cpu" if cpu_kernel.bfloat16_units() else "xla"
        assert jnp.array_equal(auto, ops.nmf(x, w, kernel=by, **bfloat16))
    with ops.forcing_cpu_bfloat16("emulated"):
        assert jnp.array_equal(ops.nmf(x, w, kernel="auto", **bfloat16), ops.nmf(x, w, **bfloat16))
    tf32 = dict(iterations=4, precision="tf32")
    assert jnp.array_equal(ops.nmf(x, w, kernel="auto", **tf32), ops.nmf(x, w, **tf32))


@pytest.mark.parametrize("gradient", ["approx", "implicit"])
def test_gradients_through_the_kernel_equal_xlas(gradient):
    x, w = _problem(40, 75, 32)
    probe = jax.random.normal(jax.random.key(2), (40, 32))

    def gradients(kernel):
        loss = lambda x, w: jnp.sum(probe * ops.nmf(x, w, iterations=10, gradient=gradient, kernel=kernel))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(x, w)

    for fused, xla in zip(gradients("pallas"), gradients("xla"), strict=True):
        np.testing.assert_allclose(fused, xla, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(xla))))


def test_the_implicit_gradient_through_the_kernel_passes_check_grads(x64):
    # An exactly factorisable x (x = W h_true, h_true in the simplex): the update converges to h_true,
    # so the fixed point's derivative, which the implicit VJP computes, is the derivative of h.
    # Columns of W on mostly separate features, so that the update converges within the iterations.
    w_key, h_key = jax.random.split(jax.random.key(3))
    separate = jnp.kron(jnp.eye(4), jnp.ones((4, 1)))
    w = ops.positive_weights(separate + 0.1 * jax.random.uniform(w_key, (16, 4), jnp.float64))
    h_true = ops.l1_normalize(jax.random.uniform(h_key, (8, 4), jnp.float64) + 0.5)
    x = h_true @ w.T
    options = ops.NMFOptions(iterations=400, adjoint_iterations=400, gradient="implicit", kernel="pallas")
    np.testing.assert_allclose(ops.nmf(x, w, options), h_true, rtol=1e-6)
    check_grads(lambda x, w: ops.nmf(x, w, options), (x, w), order=1, modes=("rev",), eps=1e-6, atol=1e-4, rtol=1e-4)


def test_one_training_step_of_cnmf_1x1_with_the_kernel_equals_the_xla_step():
    def step(kernel):
        config = tiny_config("cnmf_1x1", batch_size=4, eval_batch_size=4)
        config.model.nmf.iterations = 10
        config.model.nmf.kernel = kernel
        trainer = trainer_module.Trainer(config, configuration.validate_config(config), parallel.data_mesh())
        state = trainer.initial_state
        images = jax.random.uniform(jax.random.key(4), (4, 28, 28, 3))
        labels = jnp.arange(4) % 10
        loss_fn = lambda params: evaluation.batch_loss(trainer.graphdef, params, state.batch_stats, images, labels)  # noqa: E731
        (loss, (logits, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
        return loss, logits, grads

    (loss, logits, grads), (xla_loss, xla_logits, xla_grads) = step("pallas"), step("xla")
    np.testing.assert_allclose(loss, xla_loss, rtol=1e-5)
    np.testing.assert_allclose(logits, xla_logits, rtol=1e-4, atol=1e-5)
    # Relative to the largest gradient: some (a bias before BatchNorm) are zero but for round-off.
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(xla_grads))
    for fused, xla in zip(jax.tree.leaves(grads), jax.tree.leaves(xla_grads), strict=True):
        np.testing.assert_allclose(fused, xla, rtol=1e-3, atol=1e-5 * scale)
