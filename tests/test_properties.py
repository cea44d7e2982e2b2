"""The op's invariants as properties, searched for counterexamples by hypothesis over random shapes,
sizes, iteration counts and both update modes (bounded example counts: the file runs in well under a
minute). Float64 where a property is exact, so that tolerances test the property, not round-off.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nmfjax import NMFConv, ops
from tests.references import conv_equals_dense_on_patches, reference_approx_vjp, reference_positive_weights

# Derandomized: CI runs the same examples every time. No time health check: on a loaded CI machine
# drawing the arrays can be slow, which says nothing about the op.
QUIET = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow]}
EXAMPLES = settings(max_examples=15, **QUIET)
epsilons = st.one_of(st.none(), st.floats(0.05, 2.0))  # the pure update (eq. 3) and eq. 6
iteration_counts = st.integers(1, 30)


@st.composite
def problems(draw, max_positions=6, max_features=9, max_hidden=5, zero_rows=False):
    """``(x, w)`` in float64: non-negative ``x`` of shape ``(P, S)``, and ``W`` from
    :func:`ops.positive_weights` of a random ``u``, shape ``(S, I)``.
    """
    positions = draw(st.integers(1, max_positions))
    features = draw(st.integers(1, max_features))
    hidden = draw(st.integers(1, max_hidden))
    values = st.floats(0.0, 100.0, allow_subnormal=False) if zero_rows else st.floats(1e-3, 100.0)
    x = draw(hnp.arrays(np.float64, (positions, features), elements=values))
    u = draw(hnp.arrays(np.float64, (features, hidden), elements=st.floats(0.01, 1.0)))
    return x, reference_positive_weights(u)


@pytest.fixture(autouse=True)
def _float64(x64):
    """Every property runs in float64, like its NumPy reference."""


@EXAMPLES
@given(problem=problems(zero_rows=True), iterations=iteration_counts, epsilon=epsilons)
# Found by this test: with epsilon an all-zero row keeps h = 1/I; the contract said h = 0 in every mode.
@example(problem=(np.zeros((1, 1)), np.ones((1, 1))), iterations=1, epsilon=1.0)
def test_h_is_non_negative_and_a_zero_row_gives_zero_in_the_pure_mode_and_its_start_with_epsilon(
    problem, iterations, epsilon
):
    x, w = problem
    h = np.asarray(ops.nmf(x, w, iterations=iterations, epsilon=epsilon))
    assert np.all(np.isfinite(h)) and np.all(h >= 0)
    zero = x.sum(-1) == 0
    np.testing.assert_allclose(h[~zero].sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(h[zero], 0.0 if epsilon is None else 1.0 / w.shape[1], rtol=1e-12)


@EXAMPLES
@given(problem=problems(), iterations=iteration_counts, scale=st.floats(1e-3, 1e3))
def test_pure_mode_h_is_unchanged_when_x_is_rescaled(problem, iterations, scale):
    x, w = problem
    chex.assert_trees_all_close(
        ops.nmf(scale * x, w, iterations=iterations), ops.nmf(x, w, iterations=iterations), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize(
    "axis, rtol, atol",
    [(0, 1e-12, 1e-15), (1, 1e-10, 1e-13)],  # positions (rows of x and h), hidden units (columns of W and h)
    ids=["positions", "hidden units"],
)
@EXAMPLES
@given(problem=problems(), iterations=iteration_counts, epsilon=epsilons, data=st.data())
def test_permuting_positions_or_hidden_units_permutes_h_the_same_way(
    axis, rtol, atol, problem, iterations, epsilon, data
):
    x, w = problem
    permuted_input = x if axis == 0 else w
    order = np.asarray(data.draw(st.permutations(range(permuted_input.shape[axis]))))
    nmf = functools.partial(ops.nmf, iterations=iterations, epsilon=epsilon)
    permuted = nmf(x[order], w) if axis == 0 else nmf(x, w[:, order])
    chex.assert_trees_all_close(permuted, jnp.take(nmf(x, w), order, axis=axis), rtol=rtol, atol=atol)


@settings(max_examples=5, **QUIET)
@given(problem=problems(zero_rows=True), iterations=iteration_counts, epsilon=epsilons, data=st.data())
def test_an_all_zero_patch_gives_finite_values_and_gradients_in_every_mode(problem, iterations, epsilon, data):
    x, w = problem
    x = x.copy()
    x[data.draw(st.integers(0, x.shape[0] - 1))] = 0.0
    target = np.random.default_rng(0).normal(size=(x.shape[0], w.shape[1]))
    for gradient in ops.GRADIENTS:

        def loss(x, w, gradient=gradient):
            h = ops.nmf(x, w, iterations=iterations, epsilon=epsilon, gradient=gradient)
            return jnp.sum(h * target)

        # In float32, where autodiff of x / 1e-20 once overflowed to 0 * inf = NaN.
        value, gradients = jax.value_and_grad(loss, argnums=(0, 1))(x.astype(np.float32), w.astype(np.float32))
        chex.assert_tree_all_finite((value, gradients))


@EXAMPLES
@given(problem=problems(), iterations=iteration_counts, epsilon=epsilons, seed=st.integers(0, 2**16))
def test_the_approx_vjp_equals_its_closed_form(problem, iterations, epsilon, seed):
    x, w = problem
    h, vjp = jax.vjp(functools.partial(ops.nmf, iterations=iterations, epsilon=epsilon), x, w)
    g = np.random.default_rng(seed).normal(size=h.shape)
    chex.assert_trees_all_close(
        vjp(jnp.asarray(g)), reference_approx_vjp(x, w, np.asarray(h), g), rtol=1e-9, atol=1e-12
    )


def _relative_error(a, b):
    return max(float(jnp.linalg.norm(p - q) / jnp.linalg.norm(q)) for p, q in zip(a, b, strict=True))


@settings(max_examples=4, **QUIET)
@given(seed=st.integers(0, 2**16))
def test_the_implicit_gradient_approaches_the_unrolled_one_as_n_grows(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.05, 1.0, (3, 6))
    w = reference_positive_weights(rng.uniform(0, 1, (6, 3)))
    g = jnp.asarray(rng.normal(size=(3, 3)))

    def gradients(mode, n):
        return jax.grad(lambda x, w: jnp.sum(g * ops.nmf(x, w, iterations=n, gradient=mode)), argnums=(0, 1))(x, w)

    errors = [_relative_error(gradients("implicit", n), gradients("unrolled", n)) for n in (200, 2000)]
    assert errors[1] < errors[0] and errors[1] < 2e-2, errors


@settings(max_examples=6, **QUIET)
@given(
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    strides=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.tuples(st.integers(0, 2), st.integers(0, 2))),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    groups=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_nmf_conv_equals_nmf_dense_on_extracted_patches(kernel, strides, padding, dilation, groups, seed):
    conv = NMFConv(
        4,
        8,
        kernel,
        strides=strides,
        padding=padding,
        kernel_dilation=dilation,
        feature_group_count=groups,
        rngs=nnx.Rngs(seed),
    )
    x = np.random.default_rng(seed).uniform(0, 1, (2, 7, 6, 4)).astype(np.float32)
    conv_equals_dense_on_patches(conv, x, conv)
