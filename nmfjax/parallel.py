"""Data parallelism: one 1-D mesh over the batch, parameters and datasets replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "data"


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """The 1-D mesh the batch is split over: every visible device (or ``devices``)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXIS))


def put_replicated(mesh: jax.sharding.Mesh, array: np.ndarray) -> jax.Array:
    """A host array replicated on every device of ``mesh`` (multi-host too)."""
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])


def split_batch(batch_indices: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
    """Inside a jitted step: spreads a batch's indices over the mesh when they divide evenly."""
    if batch_indices.shape[0] % mesh.size:
        return batch_indices
    return jax.lax.with_sharding_constraint(batch_indices, batch_sharded(mesh))
