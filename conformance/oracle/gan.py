"""GAN's oracle entry (docs/algorithms.md, "GAN"): a gradient transform, no peer."""

from __future__ import annotations

import math

import numpy as np

from . import Entry


def transform(grads, center="tensor", scale="global_std"):
    """GAN's output on one step's gradients (float64), and the global factor alpha it
    used (None: nothing eligible)."""
    grads = [np.asarray(g, dtype=np.float64) for g in grads]
    centred = {}
    for i, g in enumerate(grads):
        if g.ndim < 2:
            continue
        if g.size == 0:
            centred[i] = g.copy()
        elif center == "tensor":
            centred[i] = g - g.mean()
        else:
            centred[i] = g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)
    out = list(grads)
    if not centred:
        return out, None
    n = sum(c.size for c in centred.values())
    sigma = math.sqrt(sum(float(np.sum(c ** 2)) for c in centred.values()) / max(n, 1))
    alpha = 1.0 if scale == "none" else 1.0 / (sigma + 1e-12)
    for i, c in centred.items():
        out[i] = alpha * c
    return out, alpha


ENTRY = Entry(defaults=dict(center="tensor", scale="global_std"), transform=transform)
