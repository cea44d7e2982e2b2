"""nmfjax: deep non-negative matrix factorisation networks in JAX and Flax NNX."""

__version__ = "0.2.0"

from nmfjax.layers import L1Normalize, NMFConv, NMFDense, NMFWeight, PatchConv
from nmfjax.ops import l1_normalize, nmf, nmf_update, positive_weights

__all__ = [
    "__version__",
    "L1Normalize",
    "NMFConv",
    "NMFDense",
    "NMFWeight",
    "PatchConv",
    "l1_normalize",
    "nmf",
    "nmf_update",
    "positive_weights",
]
