"""Data parallelism: one 1-D mesh over the batch, parameters and datasets replicated.

On a CPU, :func:`use_cpu_devices` splits the machine into one XLA device per
core before the backend starts: each core then works on its own share of the
batch, whose working set fits its cache, instead of both cores sharing every
large product (measured on two cores: 1.3x the training and evaluation
throughput of one device in ``train.py``).
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nmfjax.errors import ConfigError
from nmfjax.validation import is_positive_int

BATCH_AXIS = "data"


_FORCED_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def user_cpu_devices() -> int | None:
    """The CPU device count the user chose (``XLA_FLAGS`` or ``JAX_NUM_CPU_DEVICES``), if any."""
    forced = _FORCED_DEVICE_COUNT.search(os.environ.get("XLA_FLAGS", ""))
    if forced:
        return int(forced.group(1))
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return int(os.environ["JAX_NUM_CPU_DEVICES"])
    return None


def largest_dividing_count(limit: int, batch_sizes: tuple[int, ...]) -> int:
    """The largest device count up to ``limit`` that divides every batch size."""
    return max(count for count in range(1, limit + 1) if all(size % count == 0 for size in batch_sizes))


def default_cpu_devices(batch_sizes: tuple[int, ...]) -> int:
    """One device per core, or the largest count below that divides every batch size."""
    return largest_dividing_count(cpu_cores(), batch_sizes)


def use_cpu_devices(count: int | None, batch_sizes: tuple[int, ...] = ()) -> int:
    """Sets how many XLA devices the CPU backend has; call it before JAX computes anything.

    Args:
      count: the number of devices; None: one per core (see :func:`default_cpu_devices`).
      batch_sizes: what the batch is split into; only used when ``count`` is None.

    Returns:
      int: the CPU device count in effect: the user's own ``XLA_FLAGS``
      (``--xla_force_host_platform_device_count``) or ``JAX_NUM_CPU_DEVICES`` win
      over ``count``.
    """
    chosen = user_cpu_devices()
    try:
        if chosen is None:
            chosen = count if count is not None else default_cpu_devices(batch_sizes)
            jax.config.update("jax_num_cpu_devices", chosen)
        if chosen > 1:
            # Small single-device programs (keys, transfers) then run in the calling thread, not on the
            # thread pool the devices' all-reduces wait on (see one_program_at_a_time).
            jax.config.update("jax_cpu_enable_async_dispatch", False)
    except RuntimeError:  # JAX has started already (a notebook, a test): its devices stay as they are
        return len(jax.devices("cpu"))
    return chosen


def use_cpu_devices_of(config, processes: int = 1) -> int:
    """:func:`use_cpu_devices` for a training config: ``config.cpu_devices``, and this process's
    share of its batch sizes when ``processes`` split them (values the config checks will
    reject are left to them).
    """
    sizes = tuple(size for size in (config.get("batch_size"), config.get("eval_batch_size")) if is_positive_int(size))
    shares = tuple(size // processes for size in sizes if size % processes == 0)
    count = config.get("cpu_devices")
    return use_cpu_devices(count if is_positive_int(count) else None, shares)


# --- several processes (multi-host) ---

# config.distributed's fields and the variables read where a field is not set.
DISTRIBUTED_VARIABLES = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def distributed_settings(distributed, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The arguments for ``jax.distributed.initialize``: each of ``config.distributed``'s
    ``coordinator_address``, ``num_processes`` and ``process_id``, else its ``JAX_*`` variable.

    Returns:
      All three, or ``{}`` when none is set: JAX then detects the cluster itself
      (SLURM, Open MPI, Kubernetes, Cloud TPU).

    Raises:
      ConfigError: some are set and others not, or a value is out of range, naming the field.
    """
    settings, sources = {}, {}
    for field, variable in DISTRIBUTED_VARIABLES.items():
        value, source = distributed.get(field), f"config.distributed.{field}"
        if value is None and environ.get(variable):
            value, source = environ[variable], variable
            if field != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ConfigError(f"{variable}={value!r} must be an int.") from None
        if value is not None:
            settings[field], sources[field] = value, source
    if not settings:
        return settings
    missing = [field for field in DISTRIBUTED_VARIABLES if field not in settings]
    if missing:
        given = ", ".join(f"{sources[field]}={settings[field]!r}" for field in settings)
        wanted = " and ".join(f"config.distributed.{field} (or {DISTRIBUTED_VARIABLES[field]})" for field in missing)
        raise ConfigError(
            f"{given} is set, but {wanted} is not: set all three, or none to let JAX detect the cluster (SLURM, ...)."
        )
    address, count, index = settings["coordinator_address"], settings["num_processes"], settings["process_id"]
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"{sources['coordinator_address']}={address!r} must be HOST:PORT, the address of process 0, "
            "e.g. 10.0.0.1:1234."
        )
    if not is_positive_int(count):
        raise ConfigError(f"{sources['num_processes']}={count!r} must be a positive int.")
    if not (isinstance(index, int) and 0 <= index < count):
        raise ConfigError(
            f"{sources['process_id']}={index!r} must be an int from 0 to num_processes - 1 = {count - 1}."
        )
    return settings


def start_distributed(settings: Mapping[str, Any]) -> None:
    """Joins this process to a multi-process run: ``jax.distributed.initialize`` with
    :func:`distributed_settings`'s result; call it before JAX computes anything.
    """
    # The CPU devices of different processes all-reduce through gloo (TCP); without a
    # collectives implementation a multi-process CPU computation fails.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**settings)
    except ValueError as error:  # nothing given and no cluster detected: "Number of processes must be defined."
        raise ConfigError(
            f"config.distributed.enabled=True, but the run's processes are unknown ({error}). Set "
            + ", ".join(
                f"config.distributed.{field} (or {variable})" for field, variable in DISTRIBUTED_VARIABLES.items()
            )
            + ", or start the processes under a cluster manager JAX detects (SLURM: srun)."
        ) from None


def use_compilation_cache() -> pathlib.Path | None:
    """Keeps compiled programs on disk, so that a rerun, a resume or another run of the same network
    loads its train and eval steps in about a second instead of compiling them again.

    The cache is ``$XDG_CACHE_HOME/nmfjax/xla`` (default ``~/.cache/nmfjax/xla``); a
    ``JAX_COMPILATION_CACHE_DIR`` of the user's wins. Returns the directory, or None
    when JAX's own setting is used.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]
        return None
    directory = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "nmfjax" / "xla"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return directory


def one_program_at_a_time(mesh: jax.sharding.Mesh) -> bool:
    """Whether a loop over steps on ``mesh`` must wait for each step before starting the next.

    XLA's CPU client runs each device's part of a program on a thread pool no larger
    than the core count. With several CPU devices, two programs in flight can leave
    every thread waiting in an all-reduce for a device that has no thread left: the
    process hangs, then aborts (seen on 2 cores with 2 devices, in 6 of 7 runs under
    load). One program at a time costs only the overlap of dispatch with compute.
    """
    return mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """The 1-D mesh the batch is split over: every visible device (or ``devices``)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The same value on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The leading (batch) axis split over ``mesh``."""
    return NamedSharding(mesh, P(BATCH_AXIS))


def put_replicated(mesh: jax.sharding.Mesh, array: np.ndarray) -> jax.Array:
    """A host array replicated on every device of ``mesh`` (multi-host too)."""
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])


def split_batch(batch_indices: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
    """Inside a jitted step: spreads a batch's indices over the mesh when they divide evenly."""
    if batch_indices.shape[0] % mesh.size:
        return batch_indices
    return jax.lax.with_sharding_constraint(batch_indices, batch_sharded(mesh))
