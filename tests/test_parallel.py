"""One XLA device per core on the CPU: how many, who decides, and the settings that come with it."""

import json

import pytest

from nmfjax import parallel
from tests.conftest import run_process, script_command

PROBE = """
import json, os, sys
from nmfjax import parallel
count = parallel.use_cpu_devices({count}, {batch_sizes})
cache = parallel.use_compilation_cache()
import jax
print(json.dumps({{"chosen": count, "devices": jax.device_count(), "cores": parallel.cpu_cores(),
                  "async": jax.config.read("jax_cpu_enable_async_dispatch"), "cache": str(cache) if cache else None}}))
"""


def _probe(tmp_path, count=None, batch_sizes=(50,), env=None):
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(count=count, batch_sizes=tuple(batch_sizes)))
    environment = {"XLA_FLAGS": None, "JAX_NUM_CPU_DEVICES": None, "JAX_COMPILATION_CACHE_DIR": None, **(env or {})}
    child = run_process(script_command(script), tmp_path / "process", env=environment, timeout=120)
    assert child.process.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_one_device_per_core_by_default_with_synchronous_dispatch(tmp_path):
    result = _probe(tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    cores = result["cores"]
    expected = max(n for n in range(1, cores + 1) if 50 % n == 0)
    assert result["chosen"] == result["devices"] == expected
    # Several devices: programs are dispatched one at a time (async dispatch deadlocked on 2 cores).
    assert result["async"] is (expected == 1)
    assert result["cache"] == str(tmp_path / "cache" / "nmfjax" / "xla")


def test_the_count_divides_the_batch_sizes(tmp_path):
    result = _probe(tmp_path, batch_sizes=(14, 7))
    assert result["devices"] == max(n for n in range(1, result["cores"] + 1) if 7 % n == 0)


def test_a_config_count_and_the_users_xla_flags(tmp_path):
    assert _probe(tmp_path, count=3)["devices"] == 3
    flagged = _probe(tmp_path, count=3, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=5"})
    assert flagged["chosen"] == flagged["devices"] == 5  # the user's own setting wins
    cached = _probe(tmp_path, env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "mine")})
    assert cached["cache"] is None  # left to the user's JAX setting


@pytest.mark.parametrize("flags, expected", [("--xla_force_host_platform_device_count=4 --foo", 4), ("--foo", None)])
def test_the_users_device_count_is_read_from_xla_flags(monkeypatch, flags, expected):
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    assert parallel.user_cpu_devices() == expected
