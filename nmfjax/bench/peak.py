"""The machine's own float32 peak, measured in the benchmark's run: the yardstick of every row's
fraction of the peak.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nmfjax import parallel
from nmfjax.bench import timing

#: The side of the square float32 products that measure the peak, large enough that a CPU's GEMM
#: runs at its best (on two Xeon cores, as fast as 1024 and faster than 3072).
PEAK_SIZE = 2048


def measure_peak_gflops(devices: list | None = None, size: int = PEAK_SIZE, repeats: int = 5) -> float:
    """Float32 GFLOP/s of ``size x size`` products, one on each of ``devices`` at once (default: all).

    Each device multiplies its own pair of matrices (a batch split over a mesh of ``devices``) at
    ``lax.Precision.HIGHEST``, as the NMF op's products run; the figure counts ``2 size^3`` FLOPs
    per device and is the median of ``repeats`` timed calls after a warm-up.
    """
    mesh = parallel.data_mesh(devices)
    split = NamedSharding(mesh, P(parallel.BATCH_AXIS))
    shape = (mesh.size, size, size)
    a = jax.device_put(jax.random.uniform(jax.random.key(0), shape), split)
    b = jax.device_put(jax.random.uniform(jax.random.key(1), shape), split)
    product = jax.jit(
        lambda a, b: jnp.einsum("dij,djk->dik", a, b, precision=jax.lax.Precision.HIGHEST), out_shardings=split
    )
    seconds = timing.median_seconds(product, a, b, repeats=repeats)
    return 2 * size**3 * mesh.size / seconds / 1e9
