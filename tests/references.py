"""Independent references the tests compare nmfjax with: float64 NumPy transcriptions of the paper's
update and its one-step VJP written out per position (arXiv 2503.20398, eq. 3, 6, 17-19), patches
extracted by explicit loops, and NMFConv checked against NMFDense on them.
"""

import chex
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nmfjax import NMFDense


def reference_positive_weights(u):
    magnitude = np.abs(u)
    return magnitude / (magnitude.sum(axis=0, keepdims=True) + 1e-19)


def reference_forward(x, w, iterations, epsilon=None):
    x = np.asarray(x, np.float64).reshape(-1, w.shape[0])
    out = []
    for position in x:
        h = np.full(w.shape[1], 1.0 / w.shape[1])
        for _ in range(iterations):
            reconstruction = w @ h + 1e-20
            factor = w.T @ (position / reconstruction)
            h = h * factor if epsilon is None else h * (1 + epsilon * factor)
            h = h / (h.sum() + 1e-19)
        out.append(h)
    return np.stack(out)


def reference_approx_vjp(x, w, h, g):
    """SPEC's closed form, position by position; dW summed over positions."""
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for p in range(x.shape[0]):
        reconstruction = w @ h[p]
        for s in range(w.shape[0]):
            dx[p, s] = np.sum(w[s] * h[p] * g[p]) / reconstruction[s]
        for s in range(w.shape[0]):
            for i in range(w.shape[1]):
                dw[s, i] += h[p, i] * x[p, s] / reconstruction[s] * (g[p, i] - dx[p, s])
    return dx, dw


def random_problem(seed, positions=5, features=12, hidden=4):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.05, 1.0, (positions, features))
    x /= x.sum(-1, keepdims=True)
    w = reference_positive_weights(rng.uniform(0, 1, (features, hidden)))
    g = rng.normal(size=(positions, hidden))
    return x, w, g


def hand_patches(x, kernel_size, stride, padding, dilation):
    """Patches of an NHWC array by explicit loops, each ordered (dy, dx, c)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    (top, bottom), (left, right) = padding
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    rows = range(0, x.shape[1] - span_h + 1, sh)
    cols = range(0, x.shape[2] - span_w + 1, sw)
    out = np.zeros((x.shape[0], len(rows), len(cols), kh, kw, x.shape[3]))
    for a, r in enumerate(rows):
        for b, c in enumerate(cols):
            out[:, a, b] = x[:, r : r + span_h : dh, c : c + span_w : dw, :]
    return out


def conv_equals_dense_on_patches(conv, x, apply):
    """NMFConv's output (through ``apply``) against NMFDense on hand-extracted, normalised patches
    with the same weights, group by group.
    """
    channels, outputs, groups = conv.in_features, conv.out_features, conv.feature_group_count
    pad = conv.padding
    patches = hand_patches(x, conv.kernel_size, conv.strides, pad, conv.kernel_dilation)
    result = apply(jnp.asarray(x))
    chex.assert_shape(result, (*patches.shape[:3], outputs))
    kernel = np.asarray(conv.kernel[...])  # (kh, kw, C/G, I)
    channels_per_group, outputs_per_group = channels // groups, outputs // groups
    for g in range(groups):
        group_patches = patches[..., g * channels_per_group : (g + 1) * channels_per_group]
        group_patches = group_patches.reshape(*patches.shape[:3], -1)
        group_patches /= group_patches.sum(-1, keepdims=True) + 1e-19
        dense = NMFDense(group_patches.shape[-1], outputs_per_group, rngs=nnx.Rngs(1))
        dense.kernel[...] = kernel[..., g * outputs_per_group : (g + 1) * outputs_per_group].reshape(
            -1, outputs_per_group
        )
        expected = dense(jnp.asarray(group_patches, jnp.float32))
        chex.assert_trees_all_close(
            result[..., g * outputs_per_group : (g + 1) * outputs_per_group], expected, rtol=1e-5, atol=1e-7
        )
