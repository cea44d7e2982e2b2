"""The fused C++ kernel for CPUs (nmfjax.cpu_kernel) against XLA's loop: its ``h`` for every NMF layer
shape of the paper's networks, odd shapes and the input contract's edge cases, the gradients of the
three backward modes through it, feature groups (vmap), the build and its fallback. How it splits
over devices is checked in tests/test_programs.py (the compiled train step of two devices).
"""

import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nmfjax import configuration, cpu_kernel, kernels, layers, ops
from nmfjax.errors import ConfigError
from tests.conftest import tiny_config
from tests.test_kernels import LAYER_PROBLEMS, _problem

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


@pytest.mark.parametrize(
    ("positions", "features", "hidden"),
    [
        (1, 1, 1),  # one of everything
        (5, 3, 17),  # fewer positions than a register block; I one past a vector
        (121, 16, 16),  # a tile and one more position; whole vectors
        (1000, 200, 70),  # several tiles; S and I far from vector multiples (column chunks of 4 and less)
        (50, 1100, 130),  # S beyond any tile's share of the cache: the smallest tile
    ],
)
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
    # A grouped NMFConv vmaps the op over its groups: one kernel call per group.
    images = jax.random.uniform(jax.random.key(0), (2, 9, 9, 6))
    outputs = {}
    for kernel in ("xla", "cpu"):
        layer = layers.NMFConv(
            6, 8, kernel_size=3, feature_group_count=2, iterations=5, kernel=kernel, rngs=nnx.Rngs(0)
        )
        outputs[kernel] = layer(images)
    np.testing.assert_allclose(outputs["cpu"], outputs["xla"], rtol=H_RTOL, atol=H_ATOL)


def test_auto_runs_the_kernel_on_a_cpu_for_float32_only():
    x, w = _problem(64, 75, 32)

    def program(**fields):
        return jax.jit(lambda x, w: ops.nmf(x, w, **fields)).lower(x, w).as_text()

    assert cpu_kernel.TARGET in program(kernel="auto")
    assert cpu_kernel.TARGET not in program(kernel="xla")
    assert cpu_kernel.TARGET not in program(kernel="auto", precision="bfloat16")
    assert not kernels.cpu_kernel_applies("float32", jnp.float64)


def test_the_kernel_computes_in_float32_only(x64):
    with pytest.raises(ValueError, match="kernel='cpu' computes in float32"):
        ops.NMFOptions(kernel="cpu", precision="bfloat16")
    x, w = _problem(8, 75, 32)
    with pytest.raises(TypeError, match="but x and w are float64 and float64"):
        ops.nmf(x.astype(jnp.float64), w.astype(jnp.float64), kernel="cpu")


def test_the_library_is_built_once_and_found_again(tmp_path, monkeypatch):
    monkeypatch.setenv("NMFJAX_CACHE_DIR", str(tmp_path))
    library = cpu_kernel.build()
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


def test_the_source_compiles_without_warnings(tmp_path):
    # The flags of the build plus -Wall -Wextra: a warning is a bug waiting.
    command = [cpu_kernel.compiler(), *cpu_kernel._compile_flags(), "-Wall", "-Wextra", "-Werror"]
    result = subprocess.run(
        [*command, str(cpu_kernel.SOURCE), "-o", str(tmp_path / "k.so")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert pathlib.Path(tmp_path / "k.so").exists()
