"""The NMF op against an independent float64 NumPy transcription of the paper's update and its one-step VJP;
the core behaviours run with and without jit (chex.variants).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.experimental import checkify
from jax.test_util import check_grads

from nmfjax import ops
from tests.references import random_problem, reference_approx_vjp, reference_forward, reference_positive_weights

GRADIENTS = ops.GRADIENTS


# --- forward ---


@pytest.mark.parametrize("epsilon", [None, 1.0])
def test_forward_float32_matches_reference_to_round_off(epsilon):
    x, w, _ = random_problem(1)
    h = ops.nmf(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), epsilon=epsilon)
    assert h.dtype == jnp.float32
    np.testing.assert_allclose(h, reference_forward(x, w, 20, epsilon), rtol=2e-4, atol=1e-6)


def test_positive_weights_matches_spec():
    u = np.random.default_rng(4).normal(size=(9, 4))
    w = ops.positive_weights(jnp.asarray(u))
    np.testing.assert_allclose(w, reference_positive_weights(u), rtol=1e-6)
    assert bool(jnp.all(w >= 0))
    np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)


# --- gradients ---


def test_grad_reaches_u_through_positive_weights(x64):
    x, _, g = random_problem(6)
    u = np.random.default_rng(7).normal(size=(12, 4))  # signed, so |u| matters
    loss = lambda u_: jnp.sum(jnp.asarray(g) * ops.nmf(jnp.asarray(x), ops.positive_weights(u_)))
    du = np.asarray(jax.grad(loss)(jnp.asarray(u)))

    # Chain rule by hand: W = |u| / n with n = sum_s |u|, so
    # dL/du[s,i] = sign(u[s,i]) / n[i] * (dW[s,i] - sum_s' dW[s',i] W[s',i]).
    w = reference_positive_weights(u)
    h = reference_forward(x, w, 20)
    _, dw = reference_approx_vjp(x, w, h, g)
    column_sums = np.abs(u).sum(0)
    expected = np.sign(u) / column_sums * (dw - (dw * w).sum(0, keepdims=True))
    assert np.abs(du).max() > 0
    np.testing.assert_allclose(du, expected, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("epsilon", [None, 0.5])
def test_unrolled_passes_check_grads(x64, epsilon):
    x, w, _ = random_problem(8, positions=3, features=6, hidden=3)
    nmf = lambda x_, w_: ops.nmf(x_, w_, iterations=5, epsilon=epsilon, gradient="unrolled")
    check_grads(nmf, (jnp.asarray(x), jnp.asarray(w)), order=1, modes=["rev"], eps=1e-6)


def _gradients(mode, x, w, g, iterations, **options):
    loss = lambda x_, w_: jnp.sum(g * ops.nmf(x_, w_, iterations=iterations, gradient=mode, **options))
    return jax.grad(loss, argnums=(0, 1))(x, w)


def _relative_error(a, b):
    return max(float(jnp.linalg.norm(p - q) / jnp.linalg.norm(q)) for p, q in zip(a, b, strict=True))


def exactly_factorisable_problem(seed, positions=4, features=8, hidden=3):
    """x = W h_true with h_true > 0: the fixed point is interior, so the
    multiplicative updates converge linearly and the adjoint series converges.
    """
    rng = np.random.default_rng(seed)
    w = reference_positive_weights(rng.uniform(0, 1, (features, hidden)))
    h_true = rng.uniform(0.2, 1.0, (positions, hidden))
    h_true /= h_true.sum(-1, keepdims=True)
    g = rng.normal(size=(positions, hidden))
    return jnp.asarray(h_true @ w.T), jnp.asarray(w), jnp.asarray(g)


def test_implicit_approaches_unrolled_as_iterations_grow(x64):
    x, w, g = exactly_factorisable_problem(9)
    errors = [
        _relative_error(_gradients("implicit", x, w, g, n), _gradients("unrolled", x, w, g, n)) for n in (10, 50, 200)
    ]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] > 1e-2 and errors[2] < 1e-3, errors


def test_implicit_adjoint_iterations_are_configurable(x64):
    x, w, g = exactly_factorisable_problem(10)
    exact = _gradients("unrolled", x, w, g, 500)
    coarse = _gradients("implicit", x, w, g, 500, adjoint_iterations=3)
    fine = _gradients("implicit", x, w, g, 500, adjoint_iterations=500)
    assert _relative_error(fine, exact) < 1e-3 * _relative_error(coarse, exact)


def _backward_temp_bytes(mode, iterations):
    loss = lambda x, w: jnp.sum(jnp.sin(ops.nmf(x, w, iterations=iterations, gradient=mode)))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    x = jax.ShapeDtypeStruct((64, 75), jnp.float32)
    w = jax.ShapeDtypeStruct((75, 32), jnp.float32)
    return grad.lower(x, w).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mode", ["approx", "implicit"])
def test_backward_memory_does_not_grow_with_iterations(mode):
    assert _backward_temp_bytes(mode, 200) == _backward_temp_bytes(mode, 20)


def test_unrolled_backward_memory_grows_with_iterations():
    assert _backward_temp_bytes("unrolled", 200) > 5 * _backward_temp_bytes("unrolled", 20)


@pytest.mark.parametrize("mode", GRADIENTS)
def test_modes_compose_with_jit_vmap_and_grad(mode):
    x, w, g = (jnp.asarray(a, jnp.float32) for a in random_problem(11))
    weights = jnp.stack([w, jnp.roll(w, 1, axis=0)])  # a batch of two weight matrices
    inputs = jnp.stack([x, x[::-1]])

    def loss(inputs, weights):
        batched = jax.vmap(lambda x_, w_: ops.nmf(x_, w_, iterations=10, gradient=mode))
        return jnp.sum(g * batched(inputs, weights))

    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(inputs, weights)
    for b in range(2):
        one = _gradients(mode, inputs[b], weights[b], g, 10)
        np.testing.assert_allclose(dx[b], one[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(dw[b], one[1], rtol=1e-4, atol=1e-6)


# --- local learning ---


@pytest.mark.parametrize("rule", ["local_kl", "local_mse"])
def test_local_rules_hand_w_the_spec_gradient_and_keep_approx_dx(x64, rule):
    x, w, g = random_problem(13)
    dx, dw = _gradients("approx", jnp.asarray(x), jnp.asarray(w), jnp.asarray(g), 20, learning=rule)
    h = reference_forward(x, w, 20)
    expected_dx, _ = reference_approx_vjp(x, w, h, g)
    reconstruction = h @ w.T
    if rule == "local_kl":
        expected_dw = -np.einsum("pi,ps->si", h, x / reconstruction)
    else:
        expected_dw = -np.einsum("pi,ps->si", h, 2 * (x - reconstruction))
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(dw, expected_dw, rtol=1e-9, atol=1e-14)


def test_local_rule_weight_gradient_ignores_the_upstream_error(x64):
    x, w, g = (jnp.asarray(a) for a in random_problem(14))
    _, dw_one = _gradients("approx", x, w, g, 20, learning="local_kl")
    _, dw_other = _gradients("approx", x, w, -3 * g, 20, learning="local_kl")
    np.testing.assert_allclose(dw_one, dw_other)


# --- argument checks ---


@pytest.mark.parametrize(
    "x_shape, w_shape, match",
    [
        ((4, 12), (12,), r"w must have shape \(S, I\), got shape \(12,\)"),
        ((4, 12), (2, 12, 4), r"w must have shape \(S, I\), got shape \(2, 12, 4\)"),
        ((4, 10), (12, 4), r"x must have shape \(\.\.\., S\) with S = 12 .*got shape \(4, 10\)"),
        ((), (12, 4), r"x must have shape \(\.\.\., S\) with S = 12 .*got shape \(\)"),
    ],
)
def test_shape_mismatch_raises(x_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        ops.nmf(jnp.ones(x_shape), jnp.ones(w_shape))


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"iterations": 0}, ValueError, "iterations must be a positive int, got 0"),
        ({"iterations": 2.5}, TypeError, "iterations must be a positive int, got 2.5"),
        (
            {"adjoint_iterations": -1, "gradient": "implicit"},
            ValueError,
            "adjoint_iterations must be a positive int, got -1",
        ),
        ({"epsilon": 0.0}, ValueError, "epsilon must be > 0.*got 0.0"),
        ({"epsilon": -1.0}, ValueError, "epsilon must be > 0"),
        ({"epsilon": "big"}, TypeError, "epsilon must be None.*'big'"),
        (
            {"gradient": "exact"},
            ValueError,
            r"gradient must be one of \('approx', 'unrolled', 'implicit'\), got 'exact'",
        ),
        (
            {"learning": "hebb"},
            ValueError,
            r"learning must be one of \('backprop', 'local_kl', 'local_mse'\), got 'hebb'",
        ),
        (
            {"precision": "float16"},
            ValueError,
            r"precision must be one of \('float32', 'tf32', 'bfloat16'\), got 'float16'",
        ),
        ({"unroll": 1}, TypeError, "unroll must be True or False, got 1"),
    ],
)
def test_bad_options_raise_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        ops.nmf(jnp.ones((4, 12)), jnp.ones((12, 4)) / 12, **options)


# --- the loop unrolled ---


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_the_unrolled_loop_gives_the_loops_h_and_gradients(gradient):
    x, w, cotangent = (np.asarray(a, np.float32) for a in random_problem(7, positions=48, features=20, hidden=6))
    options = ops.NMFOptions(iterations=12, gradient=gradient, adjoint_iterations=9)

    def h_and_gradients(unroll):
        h, vjp = jax.vjp(lambda x_, w_: ops.nmf(x_, w_, options, unroll=unroll), x, w)
        return (h, *vjp(cotangent))

    run = jax.jit(h_and_gradients, static_argnums=0)
    loop, unrolled = run(False), run(True)
    for looped_value, unrolled_value in zip(loop, unrolled, strict=True):
        # float32 round-off: XLA fuses the straight-line updates differently from the loop's body
        scale = float(np.abs(looped_value).max())
        np.testing.assert_allclose(unrolled_value, looped_value, rtol=2e-5, atol=2e-5 * scale)
    program = jax.jit(lambda x_, w_: jax.vjp(lambda a, b: ops.nmf(a, b, options, unroll=True), x_, w_)[0])
    assert "while" not in program.lower(x, w).as_text()


# --- precision of the products ---


def _round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """float32 rounded to ``bits`` mantissa bits, to nearest with ties to even, by integer arithmetic
    on the bit pattern (independent of ``lax.reduce_precision``; no overflow for values below 1e38).
    """
    pattern = np.asarray(x, np.float32).view(np.uint32)
    dropped = 23 - bits
    if dropped == 0:
        return np.asarray(x, np.float32)
    odd = (pattern >> dropped) & 1
    rounded = (pattern + ((1 << (dropped - 1)) - 1) + odd) & ~np.uint32((1 << dropped) - 1)
    return rounded.astype(np.uint32).view(np.float32)


def test_mantissa_rounding_of_the_tests_rounds_to_nearest_even():
    one_ulp_of_10_bits = 2.0**-10
    values = np.float32([1 + one_ulp_of_10_bits / 2, 1 + 3 * one_ulp_of_10_bits / 2, 1 + 0.6 * one_ulp_of_10_bits])
    np.testing.assert_array_equal(_round_mantissa(values, 10), [1, 1 + 2 * one_ulp_of_10_bits, 1 + one_ulp_of_10_bits])
    np.testing.assert_array_equal(_round_mantissa(values, 23), values)


@pytest.mark.parametrize("precision, mantissa_bits", [("bfloat16", 7), ("tf32", 10)])
def test_lower_precision_products_round_their_operands_on_the_cpu(precision, mantissa_bits):
    a = jax.random.uniform(jax.random.key(0), (16, 24))
    b = jax.random.uniform(jax.random.key(1), (24, 8))
    with ops.forcing_cpu_bfloat16("emulated"):  # (tf32 has no other path)
        product = jax.jit(ops.matmul, static_argnums=2)(a, b, precision)

    def product_of_operands_rounded_to(bits):
        rounded_a, rounded_b = (jnp.asarray(_round_mantissa(np.asarray(v), bits)) for v in (a, b))
        return jnp.matmul(rounded_a, rounded_b, precision=jax.lax.Precision.HIGHEST)

    np.testing.assert_array_equal(product, product_of_operands_rounded_to(mantissa_bits))
    for other_bits in (mantissa_bits - 1, mantissa_bits + 1):  # one bit more or less is another product
        assert not np.array_equal(product, product_of_operands_rounded_to(other_bits)), other_bits
    if precision == "bfloat16":  # rounding to bfloat16's mantissa is a cast to bfloat16
        cast = jnp.matmul(a.astype(jnp.bfloat16).astype(jnp.float32), b.astype(jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(product, cast)
    np.testing.assert_array_equal(ops.matmul(a, b), jnp.matmul(a, b))  # float32 is the plain product on a CPU


# Native bfloat16 products sum bf16 x bf16 products (exact in float32) in another order than the
# emulation's float32 product: h differs by float32 round-off, carried along N updates. The backward
# products round operands computed from h (x / R, the adjoint) to bfloat16 again, and where the
# round-off moves one across a rounding boundary the two differ by a bfloat16 step (2**-8) there:
# the gradients agree to a fraction of one such step.
NATIVE_H_RTOL = 5e-5
NATIVE_GRADIENT_RTOL = 2e-3


def _bfloat16_by(path: str, function, *args):
    with ops.forcing_cpu_bfloat16(path):
        return jax.jit(function)(*args)


def test_native_bfloat16_products_are_bfloat16_dots_with_float32_sums():
    a = jax.random.uniform(jax.random.key(0), (64, 75))
    b = jax.random.uniform(jax.random.key(1), (75, 32))
    product = functools.partial(ops.matmul, precision="bfloat16")
    with ops.forcing_cpu_bfloat16("native"):
        native_program = jax.jit(product).lower(a, b).as_text()
    with ops.forcing_cpu_bfloat16("emulated"):
        emulated_program = jax.jit(product).lower(a, b).as_text()
    assert "bf16" in native_program and "reduce_precision" not in native_program
    assert "bf16" not in emulated_program and "reduce_precision" in emulated_program
    native, emulated = _bfloat16_by("native", product, a, b), _bfloat16_by("emulated", product, a, b)
    assert native.dtype == jnp.float32
    np.testing.assert_allclose(native, emulated, rtol=1e-6)
    # tf32 stays an emulation whatever the bfloat16 path.
    with ops.forcing_cpu_bfloat16("native"):
        assert "bf16" not in jax.jit(functools.partial(ops.matmul, precision="tf32")).lower(a, b).as_text()


@pytest.mark.parametrize("shape", [(576, 75, 32), (64, 800, 64), (2, 1024, 96)])
def test_native_bfloat16_runs_both_products_of_the_forward_loop_on_bfloat16_operands(shape):
    # XLA's CPU compiler turns a bfloat16 product whose second operand is transposed inside it into a
    # float32 one (a pair of converts): the loop takes W^T made before it (nmf_update's w_transposed).
    from nmfjax.bench.profile import nmf_loop_products

    positions, features, hidden = shape
    x, w, g = (jnp.asarray(v, jnp.float32) for v in random_problem(6, positions, features, hidden))

    def h_and_gradients(x, w, g):
        return jax.vjp(lambda x, w: ops.nmf(x, w, iterations=20, precision="bfloat16"), x, w)[1](g)

    for path, on_units in (("native", 2), ("emulated", 0)):
        with ops.forcing_cpu_bfloat16(path):
            hlo = jax.jit(h_and_gradients).lower(x, w, g).compile().as_text()
        assert nmf_loop_products(hlo) == (2, on_units), path


# The NMF layers' shapes (positions at one image, S, I) and a grouped one.
@pytest.mark.parametrize("shape", [(576, 75, 32), (64, 800, 64), (2, 1024, 96), (40, 30, 8)])
@pytest.mark.parametrize("mode", GRADIENTS)
def test_native_bfloat16_h_and_gradients_equal_the_emulation(mode, shape):
    positions, features, hidden = shape
    x, w, g = (jnp.asarray(v, jnp.float32) for v in random_problem(4, positions, features, hidden))

    def h_and_gradients(x, w, g):
        h, vjp = jax.vjp(lambda x, w: ops.nmf(x, w, iterations=20, gradient=mode, precision="bfloat16"), x, w)
        return (h, *vjp(g))

    native = _bfloat16_by("native", h_and_gradients, x, w, g)
    emulated = _bfloat16_by("emulated", h_and_gradients, x, w, g)
    full = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: ops.nmf(x, w, iterations=20, gradient=mode), x, w)[1](g))(
        x, w, g
    )
    relative = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    # Relative to the array's norm: single entries near 0 carry the round-off of their neighbours.
    assert relative(native[0], emulated[0]) < NATIVE_H_RTOL
    for name, a, b, f in zip(("dx", "dw"), native[1:], emulated[1:], full, strict=True):
        assert relative(a, b) < NATIVE_GRADIENT_RTOL, (name, relative(a, b))
        # Both paths are as far from float32 as each other.
        assert abs(relative(a, f) - relative(b, f)) < 0.5 * relative(b, f), name


def test_native_bfloat16_nmf_conv_equals_the_emulation():
    # The patches, a grouped layer with epsilon, and the gradient to the unconstrained weight.
    from flax import nnx

    from nmfjax import layers

    x = jax.random.uniform(jax.random.key(5), (2, 9, 9, 6))

    def loss_and_gradient(path):
        with ops.forcing_cpu_bfloat16(path):
            layer = layers.NMFConv(
                6, 8, 3, feature_group_count=2, epsilon=0.2, iterations=10, precision="bfloat16", rngs=nnx.Rngs(0)
            )
            return nnx.jit(nnx.value_and_grad(lambda layer, x: jnp.sum(layer(x) ** 2)))(layer, x)

    (native_loss, native_grads), (emulated_loss, emulated_grads) = (
        loss_and_gradient("native"),
        loss_and_gradient("emulated"),
    )
    np.testing.assert_allclose(native_loss, emulated_loss, rtol=NATIVE_H_RTOL)
    for a, b in zip(jax.tree.leaves(native_grads), jax.tree.leaves(emulated_grads), strict=True):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < NATIVE_GRADIENT_RTOL


def test_the_bfloat16_path_follows_the_environment_then_the_processor(monkeypatch):
    monkeypatch.setattr(ops, "_cpu_bfloat16_default", functools.cache(ops._cpu_bfloat16_default.__wrapped__))
    for path in ops.CPU_BFLOAT16_PATHS:
        monkeypatch.setenv(ops.CPU_BFLOAT16_ENV, path)
        ops._cpu_bfloat16_default.cache_clear()
        assert ops.cpu_bfloat16_path() == path
        with ops.forcing_cpu_bfloat16("emulated" if path == "native" else "native"):
            assert ops.cpu_bfloat16_path() != path  # forcing wins over the environment
    monkeypatch.setenv(ops.CPU_BFLOAT16_ENV, "amx")
    ops._cpu_bfloat16_default.cache_clear()
    with pytest.raises(ValueError, match=r"NMFJAX_CPU_BFLOAT16 must be one of \('native', 'emulated'\), got 'amx'"):
        ops.cpu_bfloat16_path()
    monkeypatch.delenv(ops.CPU_BFLOAT16_ENV)
    ops._cpu_bfloat16_default.cache_clear()
    assert ops.cpu_bfloat16_path() == ("native" if ops.cpu_has_bfloat16_units() else "emulated")
    assert ops.describe_precision("bfloat16", "gpu") == "bfloat16 on the accelerator's matrix units"
    assert "no CPU has TF32 units" in ops.describe_precision("tf32", "cpu")
    with pytest.raises(ValueError, match="path must be one of"):
        with ops.forcing_cpu_bfloat16("fast"):
            pass


@pytest.mark.parametrize(
    ("flags", "units"),
    [("fpu sse avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True), ("fpu sse avx2 avx512f", False)],
)
def test_bfloat16_units_are_read_from_the_processors_flags(flags, units):
    assert ops.cpu_has_bfloat16_units(f"processor\t: 0\nflags\t\t: {flags}\n") is units
    assert ops.cpu_has_bfloat16_units("") is False


@pytest.mark.parametrize("mode", GRADIENTS)
def test_h_and_gradients_in_lower_precision_stay_near_float32(mode):
    x, w, g = (jnp.asarray(v, jnp.float32) for v in random_problem(3, positions=40, features=30, hidden=8))

    def results(precision):
        h, vjp = jax.vjp(lambda x, w: ops.nmf(x, w, gradient=mode, precision=precision), x, w)
        return (h, *vjp(g))

    full = results("float32")
    errors = {}
    for precision in ("tf32", "bfloat16"):
        lower = results(precision)
        errors[precision] = [
            float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(lower, full, strict=True)
        ]
        assert all(np.isfinite(a).all() for a in lower)
    for tf32, bfloat16 in zip(errors["tf32"], errors["bfloat16"], strict=True):  # h, dx, dw
        assert 0 < tf32 < bfloat16 < 0.05, errors


def test_lower_precision_of_float64_is_a_type_error(x64):
    with pytest.raises(TypeError, match="precision='tf32' rounds float32 operands, but x and w compute in float64"):
        ops.nmf(jnp.ones((4, 12)), jnp.ones((12, 4)) / 12, precision="tf32")


# --- the core behaviours, with and without jit ---


class NMFOpVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(epsilon=(None, 0.3), iterations=(1, 20))
    def test_forward_matches_numpy_reference_float64(self, epsilon, iterations):
        x, w, _ = random_problem(0)
        with jax.enable_x64(True):
            h = self.variant(functools.partial(ops.nmf, iterations=iterations, epsilon=epsilon))(x, w)
            chex.assert_type(h, jnp.float64)
            chex.assert_trees_all_close(h, reference_forward(x, w, iterations, epsilon), rtol=1e-12, atol=1e-15)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(epsilon=(None, 0.5), gradient=GRADIENTS)
    def test_output_is_nonnegative_and_sums_to_one_for_any_batch_shape(self, epsilon, gradient):
        rng = np.random.default_rng(2)
        x = jnp.asarray(rng.uniform(0, 3, (2, 3, 4, 7)), jnp.float32)
        w = ops.positive_weights(jnp.asarray(rng.uniform(0, 1, (7, 5)), jnp.float32))
        h = self.variant(functools.partial(ops.nmf, epsilon=epsilon, gradient=gradient))(x, w)
        chex.assert_shape(h, (2, 3, 4, 5))
        chex.assert_tree_all_finite(h)
        assert bool(jnp.all(h >= 0))
        chex.assert_trees_all_close(h.sum(-1), jnp.ones((2, 3, 4)), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pure_mode_is_invariant_to_input_scale(self):
        x, w, _ = (jnp.asarray(a, jnp.float32) for a in random_problem(3))
        nmf = self.variant(ops.nmf)
        chex.assert_trees_all_close(nmf(x, w), nmf(7.5 * x, w), rtol=1e-5, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_approx_vjp_equals_the_closed_form(self):
        x, w, g = random_problem(5)
        with jax.enable_x64(True):
            h, vjp = jax.vjp(self.variant(functools.partial(ops.nmf, epsilon=0.7)), jnp.asarray(x), jnp.asarray(w))
            expected = reference_approx_vjp(x, w, np.asarray(h), g)
            chex.assert_trees_all_close(vjp(jnp.asarray(g)), expected, rtol=1e-10, atol=1e-14)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*GRADIENTS)
    def test_all_zero_patches_give_finite_gradients_in_float32(self, gradient):
        # An all-zero patch (a black image region, or a ReLU-silenced one) gives h = 0 and R = 1e-20;
        # autodiff of x / R must not form 0 * (1e-20)**-2 = 0 * inf = NaN (it did in training).
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (4, 75)).astype(np.float32)
        x[1] = 0.0
        u = jnp.asarray(rng.uniform(0, 1, (75, 32)), jnp.float32)
        target = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)

        def loss(x, u):
            h = ops.nmf(ops.l1_normalize(x), ops.positive_weights(u), iterations=20, gradient=gradient)
            return jnp.sum(h * target)

        gradients = self.variant(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), u)
        chex.assert_tree_all_finite(gradients)
        assert float(jnp.abs(gradients[1]).sum()) > 0

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(gradient=GRADIENTS, dtype=("bfloat16", "float16", "float32", "float64"))
    def test_h_is_at_least_float32_and_gradients_keep_the_input_dtype(self, gradient, dtype):
        with jax.enable_x64(True):
            x, w, g = (jnp.asarray(a, dtype) for a in random_problem(12))
            h = self.variant(functools.partial(ops.nmf, iterations=5, gradient=gradient))(x, w)
            chex.assert_type(h, jnp.float64 if dtype == "float64" else jnp.float32)
            assert ops.compute_dtype(x, w) == h.dtype
            gradients = self.variant(lambda x, w: _gradients(gradient, x, w, g.astype(h.dtype), 5))(x, w)
            chex.assert_type(gradients, [dtype, dtype])
            chex.assert_tree_all_finite(gradients)

    @chex.variants(with_jit=True, without_jit=True)
    def test_the_debug_check_finds_negative_and_non_finite_input(self):
        x, w, _ = (jnp.asarray(a, jnp.float32) for a in random_problem(13))
        checked = self.variant(checkify.checkify(functools.partial(ops.nmf, check_inputs=True)))
        error, h = checked(x, w)
        error.throw()  # a clean input passes
        chex.assert_trees_all_close(h, ops.nmf(x, w))
        for bad, smallest in ((x.at[0, 0].set(-0.5), "-0.5"), (x.at[1, 2].set(jnp.nan), "nan")):
            error, _ = checked(bad, w)
            with pytest.raises(checkify.JaxRuntimeError, match="nmf: x must be non-negative and finite"):
                error.throw()
            assert smallest in str(error.get()) or "not finite" in str(error.get())
        error, _ = checked(x, w.at[0, 0].set(jnp.inf))
        with pytest.raises(checkify.JaxRuntimeError, match="nmf: w must be non-negative and finite.* 1 entries"):
            error.throw()


def test_a_non_floating_input_is_a_type_error_naming_the_fix():
    with pytest.raises(TypeError, match=r"x must be a floating array .* got int32; convert it, e.g. x.astype"):
        ops.nmf(jnp.ones((3, 4), jnp.int32), jnp.ones((4, 2)))
