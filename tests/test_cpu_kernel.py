"""The fused C++ kernel for CPUs (nmfjax.cpu_kernel) against XLA's loop: its ``h`` for every NMF layer
shape of the paper's networks, odd shapes and the input contract's edge cases, the gradients of the
three backward modes through it, feature groups (vmap), its bfloat16 products (on the bf16 units and
widened), its builds for processors without AVX-512 or AVX512-BF16, the build and its fallback. How it
splits over devices is checked in tests/test_programs.py (the compiled train step of two devices).
"""

import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nmfjax import configuration, cpu_kernel, kernels, layers, ops
from nmfjax.errors import ConfigError
from tests.test_kernels import LAYER_PROBLEMS, _problem
from tests.tiny_configs import tiny_config

# float32 round-off: the kernel's products sum in another order than XLA's GEMMs, its quotients are
# within 2 ulp, and the N updates carry the differences along.
H_RTOL, H_ATOL = 2e-5, 1e-7

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(), reason=f"the CPU kernel cannot be built here: {cpu_kernel.unavailable_reason()}"
)


@pytest.mark.parametrize("epsilon", [None, 0.5])
@pytest.mark.parametrize(("positions", "features", "hidden"), LAYER_PROBLEMS)
def test_h_equals_xlas_for_every_nmf_layer_of_the_networks(positions, features, hidden, epsilon):
    x, w = _problem(positions, features, hidden)
    xla = ops.nmf(x, w, iterations=20, epsilon=epsilon)
    fused = ops.nmf(x, w, iterations=20, epsilon=epsilon, kernel="cpu")
    np.testing.assert_allclose(fused, xla, rtol=H_RTOL, atol=H_ATOL)


ODD_SHAPES = [
    (1, 1, 1),  # one of everything
    (5, 3, 17),  # fewer positions than a register block; I one past a vector
    (121, 16, 16),  # a tile and one more position; whole vectors
    (1000, 200, 70),  # several tiles; S and I far from vector multiples (column chunks of 4 and less)
    (50, 1100, 130),  # S beyond any tile's share of the cache: the smallest tile
]


@pytest.mark.parametrize(("positions", "features", "hidden"), ODD_SHAPES)
def test_h_equals_xlas_for_odd_shapes(positions, features, hidden):
    x, w = _problem(positions, features, hidden, seed=positions)
    np.testing.assert_allclose(
        ops.nmf(x, w, iterations=7, kernel="cpu"), ops.nmf(x, w, iterations=7), rtol=H_RTOL, atol=H_ATOL
    )


def test_no_positions_give_an_empty_h():
    _, w = _problem(1, 75, 32)
    assert ops.nmf(jnp.zeros((0, 75)), w, kernel="cpu").shape == (0, 32)


@pytest.mark.parametrize(("epsilon", "expected"), [(None, 0.0), (0.5, 1 / 32)])
def test_an_all_zero_row_gives_what_the_op_promises(epsilon, expected):
    x, w = _problem(40, 75, 32)
    x = x.at[7].set(0.0)
    h = ops.nmf(x, w, epsilon=epsilon, kernel="cpu")
    np.testing.assert_array_equal(h[7], np.full(32, expected, np.float32))
    assert np.all(np.isfinite(h))


def test_a_nan_in_x_gives_nan_in_its_row_only():
    x, w = _problem(40, 75, 32)
    h = np.asarray(ops.nmf(x.at[3, 5].set(jnp.nan), w, kernel="cpu"))
    assert np.all(np.isnan(h[3]))
    assert np.all(np.isfinite(np.delete(h, 3, axis=0)))


def test_repeated_calls_are_bitwise_equal():
    # Tiles go to whichever thread is free: the result must not depend on which.
    x, w = _problem(14400, 75, 32)
    call = jax.jit(lambda x, w: ops.nmf(x, w, kernel="cpu"))
    first = np.asarray(call(x, w))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(call(x, w)), first)


@pytest.mark.parametrize("gradient", ops.GRADIENTS)
def test_the_gradients_through_the_kernel_equal_xlas(gradient):
    x, w = _problem(300, 75, 32)
    g = jax.random.normal(jax.random.key(3), (300, 32))

    def loss(x, w, kernel):
        return jnp.sum(g * ops.nmf(x, w, iterations=10, gradient=gradient, kernel=kernel))

    expected = jax.grad(loss, argnums=(0, 1))(x, w, "xla")
    for fused, xla in zip(jax.grad(loss, argnums=(0, 1))(x, w, "cpu"), expected, strict=True):
        np.testing.assert_allclose(fused, xla, rtol=1e-4, atol=1e-6 * float(jnp.abs(xla).max()))


def test_feature_groups_under_vmap_equal_xlas():
    # A grouped NMFConv vmaps the op over its groups: one kernel call per group, forward and backward.
    images = jax.random.uniform(jax.random.key(0), (2, 9, 9, 6))
    outputs, gradients = {}, {}
    for kernel in ("xla", "cpu"):
        layer = layers.NMFConv(
            6, 8, kernel_size=3, feature_group_count=2, iterations=5, kernel=kernel, rngs=nnx.Rngs(0)
        )
        outputs[kernel] = layer(images)
        graph, params = nnx.split(layer)

        def loss(params, images, graph=graph):
            return jnp.sum(jnp.sin(nnx.merge(graph, params)(images)))

        gradients[kernel] = jax.grad(loss, argnums=(0, 1))(params, images)
    np.testing.assert_allclose(outputs["cpu"], outputs["xla"], rtol=H_RTOL, atol=H_ATOL)
    # (entries that cancel to ~1e-5 of the largest differ by float32's round-off of the terms they sum)
    for fused, xla in zip(jax.tree.leaves(gradients["cpu"]), jax.tree.leaves(gradients["xla"]), strict=True):
        np.testing.assert_allclose(fused, xla, rtol=1e-3, atol=1e-4 * float(jnp.abs(xla).max()))


def _backward_problem(positions, features, hidden):
    x, w = _problem(positions, features, hidden, seed=positions)
    h = ops.nmf(x, w, iterations=10)
    return x, w, h, jax.random.normal(jax.random.key(positions), h.shape)


def _assert_gradients_close(got, expected, rtol, atol):
    for fused, xla in zip(got, expected, strict=True):
        np.testing.assert_allclose(fused, xla, rtol=rtol, atol=atol * float(jnp.abs(xla).max()))


@pytest.mark.parametrize(("positions", "features", "hidden"), LAYER_PROBLEMS + ODD_SHAPES)
def test_the_one_step_backward_equals_xlas(positions, features, hidden):
    x, w, h, g = _backward_problem(positions, features, hidden)
    got = jax.jit(cpu_kernel.one_step_backward)(x, w, h, g)
    _assert_gradients_close(got, ops.one_step_vjp(x, w, h, g), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("positions", "features", "hidden"), LAYER_PROBLEMS + ODD_SHAPES[1:])
def test_the_one_step_backward_at_bfloat16_equals_xlas(positions, features, hidden):
    # The same rounded operands as XLA's products on the bf16 units; the sums in another order.
    x, w, h, g = _backward_problem(positions, features, hidden)
    with ops.forcing_cpu_bfloat16("native"):
        expected = ops.one_step_vjp(x, w, h, g, "bfloat16")
    got = cpu_kernel.one_step_backward(x, w, h, g, "bfloat16")
    _assert_gradients_close(got, expected, rtol=2e-2, atol=2e-3)
    # ... and the kernel did round: float32's gradients are much further away.
    float32 = cpu_kernel.one_step_backward(x, w, h, g)
    for fused, xla, exact in zip(got, expected, float32, strict=True):
        assert float(jnp.abs(fused - exact).max()) > 10 * float(jnp.abs(fused - xla).max())


def test_the_one_step_backward_of_no_positions_is_zero():
    x, w, h, g = _backward_problem(0, 75, 32)
    dx, dw = cpu_kernel.one_step_backward(x, w, h, g)
    assert dx.shape == (0, 75)
    np.testing.assert_array_equal(dw, np.zeros((75, 32), np.float32))


def test_repeated_backward_calls_are_bitwise_equal():
    # dW sums the tiles in groups, in order, whichever thread takes a group.
    x, w, h, g = _backward_problem(14400, 75, 32)
    call = jax.jit(cpu_kernel.one_step_backward)
    first = [np.asarray(a) for a in call(x, w, h, g)]
    for _ in range(3):
        for again, before in zip(call(x, w, h, g), first, strict=True):
            np.testing.assert_array_equal(np.asarray(again), before)


def test_the_backward_over_two_devices_equals_one_device():
    # Positions split over two devices: each sums dW over its own, the partition rule adds them.
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from nmfjax import cpu_kernel, ops
        from tests.test_kernels import _problem
        x, w = _problem(2 * 1000, 800, 64)
        g = jax.random.normal(jax.random.key(1), (2000, 64))
        def loss(x, w, kernel):
            return jnp.sum(g * ops.nmf(x, w, iterations=5, kernel=kernel))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
        mesh = jax.make_mesh((2,), ("data",))
        split = jax.device_put(x, NamedSharding(mesh, P("data", None)))
        text = grad.lower(split, w, "cpu").compile().as_text()
        assert cpu_kernel.BACKWARD_TARGET in text and "all-reduce" in text
        for fused, xla in zip(grad(split, w, "cpu"), grad(x, w, "xla"), strict=True):
            np.testing.assert_allclose(fused, xla, rtol=1e-4, atol=1e-6 * float(jnp.abs(xla).max()))
        print("two devices ok")
        """
    )
    environment = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    _run_python(script, environment, "two devices ok")


def _run_python(script: str, environment: dict, says: str) -> None:
    """Runs ``script`` in a Python process of its own (from the repository, bounded) and checks that it
    succeeded and printed ``says``.
    """
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        cwd=pathlib.Path(__file__).parents[1],
    )
    assert result.returncode == 0 and says in result.stdout, result.stderr[-3000:]


# bfloat16: both sides round the same operands to nearest even and sum them in float32, in another
# order; where a sum lands beside a rounding boundary, one element of h rounds to the other bfloat16
# neighbour (2^-8 relative) in the next update, and the updates carry that along.
BFLOAT16_RTOL, BFLOAT16_ATOL = 2e-3, 1e-5


@pytest.mark.parametrize(("epsilon", "path"), [(None, "native"), (0.5, "emulated")])
@pytest.mark.parametrize(("positions", "features", "hidden"), LAYER_PROBLEMS)
def test_h_at_bfloat16_equals_xlas_by_either_path(positions, features, hidden, epsilon, path):
    x, w = _problem(positions, features, hidden)
    with ops.forcing_cpu_bfloat16(path):
        xla = ops.nmf(x, w, iterations=20, epsilon=epsilon, precision="bfloat16")
    fused = ops.nmf(x, w, iterations=20, epsilon=epsilon, precision="bfloat16", kernel="cpu")
    np.testing.assert_allclose(fused, xla, rtol=BFLOAT16_RTOL, atol=BFLOAT16_ATOL)
    # ... and the kernel did round: float32's h is much further away.
    float32 = ops.nmf(x, w, iterations=20, epsilon=epsilon, kernel="cpu")
    assert float(jnp.abs(fused - float32).max()) > 10 * float(jnp.abs(fused - xla).max())


@pytest.mark.parametrize("gradient", ops.GRADIENTS)
def test_the_gradients_through_the_kernel_at_bfloat16_equal_xlas(gradient):
    x, w = _problem(300, 75, 32)
    g = jax.random.normal(jax.random.key(3), (300, 32))

    def loss(x, w, kernel):
        return jnp.sum(g * ops.nmf(x, w, iterations=10, gradient=gradient, kernel=kernel, precision="bfloat16"))

    expected = jax.grad(loss, argnums=(0, 1))(x, w, "xla")
    for fused, xla in zip(jax.grad(loss, argnums=(0, 1))(x, w, "cpu"), expected, strict=True):
        np.testing.assert_allclose(fused, xla, rtol=2e-2, atol=2e-3 * float(jnp.abs(xla).max()))


@pytest.fixture
def avx512_build(monkeypatch):
    """``auto``'s choice as on a processor with AVX-512, wherever the tests run (the programs are the same)."""
    monkeypatch.setattr(cpu_kernel, "vector_bits", lambda: kernels.AVX512_BITS)


def test_auto_runs_the_kernel_for_float32_and_for_bfloat16_on_bf16_units(avx512_build):
    x, w = _problem(64, 75, 32)

    def program(**fields):
        return jax.jit(lambda x, w: ops.nmf(x, w, **fields)).lower(x, w).as_text()

    assert cpu_kernel.TARGET in program(kernel="auto")
    assert cpu_kernel.TARGET not in program(kernel="xla")
    # ... and the one-step backward, where the gradient is "approx"
    x, w = _problem(64, 75, 32)

    def backward(**fields):
        gradient = jax.grad(lambda x, w: jnp.sum(ops.nmf(x, w, **fields) ** 2), argnums=(0, 1))
        return jax.jit(gradient).lower(x, w).as_text()

    assert cpu_kernel.BACKWARD_TARGET in backward(kernel="auto")
    assert cpu_kernel.BACKWARD_TARGET not in backward(kernel="xla")
    assert cpu_kernel.BACKWARD_TARGET not in backward(kernel="auto", gradient="implicit")
    assert cpu_kernel.TARGET not in program(kernel="auto", precision="tf32")
    with ops.forcing_cpu_bfloat16("native"):
        on_units = cpu_kernel.TARGET in program(kernel="auto", precision="bfloat16")
    assert on_units == cpu_kernel.bfloat16_units() == kernels.cpu_kernel_applies("bfloat16", jnp.float32, "native")
    with ops.forcing_cpu_bfloat16("emulated"):  # the emulation stays XLA's loop
        assert cpu_kernel.TARGET not in program(kernel="auto", precision="bfloat16")
        assert cpu_kernel.TARGET in program(kernel="cpu", precision="bfloat16")
    assert not kernels.cpu_kernel_applies("float32", jnp.float64, "native")


def test_auto_leaves_the_nmf_op_to_xlas_loop_where_the_kernel_has_avx2s_vectors(monkeypatch):
    # (there it computes the same but trains and evaluates slower: docs/bench_cpu/avx2/cpu_kernel.json)
    monkeypatch.setattr(cpu_kernel, "vector_bits", lambda: 256)
    x, w = _problem(64, 75, 32)
    gradient = jax.grad(lambda x, w: jnp.sum(ops.nmf(x, w, kernel="auto") ** 2), argnums=(0, 1))
    program = jax.jit(gradient).lower(x, w).as_text()
    assert cpu_kernel.TARGET not in program and cpu_kernel.BACKWARD_TARGET not in program
    assert cpu_kernel.TARGET in jax.jit(lambda x, w: ops.nmf(x, w, kernel="cpu")).lower(x, w).as_text()
    assert not any(kernels.cpu_kernel_applies(precision, jnp.float32, "native") for precision in ops.PRECISIONS)


def test_the_kernel_reports_its_bf16_units_as_the_processor_has_them():
    # -march=native compiles the vdpbf16ps path exactly where Linux lists avx512_bf16.
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("AVX512-BF16 is an x86 feature")
    assert cpu_kernel.bfloat16_units() == ("avx512_bf16" in pathlib.Path("/proc/cpuinfo").read_text().split())


def test_the_kernel_reports_its_vector_width_as_the_processor_has_it():
    # -march=native compiles the 16-float vectors exactly where Linux lists avx512f; else 8 (AVX2).
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("AVX-512 is an x86 feature")
    assert cpu_kernel.vector_bits() == (512 if "avx512f" in pathlib.Path("/proc/cpuinfo").read_text().split() else 256)


# The builds for processors without a feature this one has, built here by turning the feature off:
# without AVX512-BF16 the bfloat16 pairs are widened to float32; without AVX-512 the vectors hold 8
# floats and the register blocks are half as tall (AVX2's 16 registers). Each must compute what XLA
# does, as this processor's build does. (A process of its own: the FFI targets are global.)
WITHOUT_FEATURE = [
    pytest.param(
        "-mno-avx512bf16",
        "assert not cpu_kernel.bfloat16_units()",
        marks=pytest.mark.skipif(not cpu_kernel.bfloat16_units(), reason="the bfloat16 products run widened here"),
        id="without AVX512-BF16",
    ),
    pytest.param(
        "-mno-avx512f",
        "assert cpu_kernel.vector_bits() == 256 and not cpu_kernel.bfloat16_units()",
        marks=pytest.mark.skipif(cpu_kernel.vector_bits() != 512, reason="the kernel runs 256-bit vectors here"),
        id="without AVX-512",
    ),
]


@pytest.mark.parametrize(("flag", "built_without"), WITHOUT_FEATURE)
def test_the_builds_for_processors_without_a_feature_compute_as_xla(flag, built_without, tmp_path):
    script = (
        textwrap.dedent(
            """
        import jax, numpy as np
        from nmfjax import cpu_kernel, ops
        flags = cpu_kernel._compile_flags
        cpu_kernel._compile_flags = lambda: [*flags(), FLAG, *WARNINGS]
        BUILT_WITHOUT
        from tests.test_kernels import _problem  # (after the build: its module builds the kernel)
        for positions, features, hidden in [(300, 75, 32), (50, 800, 64), (37, 33, 17)]:
            x, w = _problem(positions, features, hidden)
            for epsilon in (None, 0.5):
                xla = ops.nmf(x, w, epsilon=epsilon)
                np.testing.assert_allclose(ops.nmf(x, w, epsilon=epsilon, kernel="cpu"), xla, rtol=H_RTOL, atol=H_ATOL)
            g = jax.random.normal(jax.random.key(1), xla.shape)
            for got, want in zip(cpu_kernel.one_step_backward(x, w, xla, g), ops.one_step_vjp(x, w, xla, g)):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))
            with ops.forcing_cpu_bfloat16("emulated"):
                xla = ops.nmf(x, w, precision="bfloat16")
            fused = ops.nmf(x, w, precision="bfloat16", kernel="cpu")
            np.testing.assert_allclose(fused, xla, rtol=RTOL, atol=ATOL)
            with ops.forcing_cpu_bfloat16("emulated"):
                expected = ops.one_step_vjp(x, w, xla, g, "bfloat16")
            for got, want in zip(cpu_kernel.one_step_backward(x, w, xla, g, "bfloat16"), expected):
                np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-3 * float(np.abs(want).max()))
        print("built without ok")
        """
        )
        .replace("FLAG", repr(flag))
        .replace("BUILT_WITHOUT", built_without)
        .replace("WARNINGS", repr(WARNINGS_ARE_ERRORS))
        .replace("H_RTOL", repr(H_RTOL))
        .replace("H_ATOL", repr(H_ATOL))
        .replace("RTOL", repr(BFLOAT16_RTOL))
        .replace("ATOL", repr(BFLOAT16_ATOL))
    )
    environment = {**os.environ, "NMFJAX_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    _run_python(script, environment, "built without ok")


def test_the_kernel_computes_in_float32_or_bfloat16(x64):
    with pytest.raises(ValueError, match="kernel='cpu' computes in float32 or bfloat16, not precision='tf32'"):
        ops.NMFOptions(kernel="cpu", precision="tf32")
    with pytest.raises(ValueError, match="the CPU kernel's products run at"):
        cpu_kernel.nmf_forward(*_problem(8, 75, 32), iterations=3, precision="tf32")
    x, w = _problem(8, 75, 32)
    with pytest.raises(TypeError, match="but x and w are float64 and float64"):
        ops.nmf(x.astype(jnp.float64), w.astype(jnp.float64), kernel="cpu")


# The build's flags plus -Wall -Wextra -Werror (a warning is a bug waiting), here for this processor and in
# test_the_builds_for_processors_without_a_feature_compute_as_xla for the builds without AVX-512 features.
WARNINGS_ARE_ERRORS = ["-Wall", "-Wextra", "-Werror"]


def test_the_library_is_built_once_without_warnings_and_found_again(tmp_path, monkeypatch):
    monkeypatch.setenv("NMFJAX_CACHE_DIR", str(tmp_path))
    flags = cpu_kernel._compile_flags
    monkeypatch.setattr(cpu_kernel, "_compile_flags", lambda: [*flags(), *WARNINGS_ARE_ERRORS])
    library = cpu_kernel.build()  # (raises with the compiler's message on a warning)
    assert library.parent == tmp_path / "cpu_kernel" and library.exists()
    built = library.stat().st_mtime_ns
    assert cpu_kernel.build() == library
    assert library.stat().st_mtime_ns == built
    assert [path.name for path in library.parent.iterdir()] == [library.name]  # no scratch left behind


def test_without_a_compiler_the_build_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("NMFJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler .*set CXX"):
        cpu_kernel.build()
    assert not (tmp_path / "cpu_kernel").exists()


def test_a_failed_compilation_leaves_no_library(tmp_path, monkeypatch):
    failing = tmp_path / "failing-compiler"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo failing 1.0 && exit 0\necho 'broken' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("NMFJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(failing))
    with pytest.raises(RuntimeError, match="could not compile cpu_kernel.cc:\nbroken"):
        cpu_kernel.build()
    assert list((tmp_path / "cache" / "cpu_kernel").iterdir()) == []


def test_auto_falls_back_to_xla_where_the_kernel_is_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "unavailable_reason", lambda: "no C++ compiler ('c++')")
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    jax.clear_caches()  # the op's jitted core was traced with the kernel by the tests before
    x, w = _problem(64, 75, 32)
    text = jax.jit(lambda x, w: ops.nmf(x, w, kernel="auto")).lower(x, w).as_text()
    assert cpu_kernel.TARGET not in text
    with pytest.raises(ConfigError, match="kernel='cpu' cannot run here: no C\\+\\+ compiler"):
        configuration.validate_config(tiny_config(**{"model.nmf.kernel": "cpu"}))
