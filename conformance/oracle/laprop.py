"""LaProp's oracle entry (docs/algorithms.md, "LaProp")."""

from __future__ import annotations

import numpy as np

from . import Entry, Peer, Scaling
from ._peers import timm_laprop


def step(t, theta, g, s, h):
    lr, b1, b2, wd = h["lr"], h["b1"], h["b2"], h["weight_decay"]
    s["v"] = b2 * s["v"] + (1 - b2) * g ** 2
    s["m"] = b1 * s["m"] + (1 - b1) * g / (np.sqrt(s["v"] / (1 - b2 ** t)) + h["eps"])
    return theta - lr * wd * theta - lr * s["m"] / (1 - b1 ** t)


ENTRY = Entry(
    defaults=dict(lr=4e-4, b1=0.9, b2=0.999, eps=1e-15, weight_decay=0.0),
    buffers=("m", "v"),
    step=step,
    first_direction=lambda g, h: g / (np.abs(g) + h["eps"]),  # sqrt(v/(1-b2)) = |g|
    scaling=Scaling(eps={"eps": 1}),
    peers=(
        Peer("timm LaProp", dict(lr=4e-3), "torch", timm_laprop, ("torch", "timm"),
             bias_corrected=("b1", "b2"), scalars_in_run_dtype=True, bench=("foreach",)),
    ),
)
