"""The machine's own peaks, measured in the benchmark's run (float32, and bfloat16 operands with float32
sums): the yardsticks of every row's fraction of the peak; and the processor's name.
"""

from __future__ import annotations

import pathlib
import platform

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nmfjax import parallel
from nmfjax.bench import timing

#: The side of the square float32 products that measure the peak, large enough that a CPU's GEMM
#: runs at its best (on two Xeon cores, as fast as 1024 and faster than 3072).
PEAK_SIZE = 2048


def measure_peak_gflops(
    devices: list | None = None, size: int = PEAK_SIZE, repeats: int = 5, operands: str = "float32"
) -> float:
    """GFLOP/s of ``size x size`` products, one on each of ``devices`` at once (default: all).

    Each device multiplies its own pair of matrices (a batch split over a mesh of ``devices``) with
    float32 sums: float32 ``operands`` at ``lax.Precision.HIGHEST``, as the NMF op's float32 products
    run, or ``"bfloat16"`` ones (cast before the timed calls), as the native bfloat16 products run
    on a CPU with bf16 units. The figure counts ``2 size^3`` FLOPs per device and is the median of
    ``repeats`` timed calls after a warm-up.
    """
    mesh = parallel.data_mesh(devices)
    split = NamedSharding(mesh, P(parallel.BATCH_AXIS))
    shape = (mesh.size, size, size)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[operands]
    a = jax.device_put(jax.random.uniform(jax.random.key(0), shape).astype(dtype), split)
    b = jax.device_put(jax.random.uniform(jax.random.key(1), shape).astype(dtype), split)
    product = jax.jit(
        lambda a, b: jnp.einsum(
            "dij,djk->dik", a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        ),
        out_shardings=split,
    )
    seconds = timing.median_seconds(product, a, b, repeats=repeats)
    return 2 * size**3 * mesh.size / seconds / 1e9


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
