"""Lion's oracle entry (docs/algorithms.md, "Lion")."""

from __future__ import annotations

import numpy as np

from . import Entry, Peer, Scaling, Switch


def step(t, theta, g, s, h):
    lr, b1, b2, wd = h["lr"], h["b1"], h["b2"], h["weight_decay"]
    c = b1 * s["m"] + (1 - b1) * g
    s["m"] = b2 * s["m"] + (1 - b2) * g
    return theta - lr * wd * theta - lr * np.sign(c)


def sign_arguments(grads_per_step, h):
    """Per step and tensor, the value whose sign is the direction, the size of the terms
    it is summed from (its rounding is relative to that), and the jump of the
    parameter where the sign turns (from -lr to +lr).  The momentum depends on the
    gradients alone, so it is followed here without the parameters."""
    b1, b2 = h["b1"], h["b2"]
    m = [np.zeros(np.shape(g)) for g in grads_per_step[0]]
    out = []
    for grads in grads_per_step:
        step_out = []
        for i, g in enumerate(grads):
            g = np.asarray(g, dtype=np.float64)
            step_out.append(Switch(b1 * m[i] + (1 - b1) * g,
                                   np.abs(b1 * m[i]) + np.abs((1 - b1) * g), 2 * h["lr"]))
            m[i] = b2 * m[i] + (1 - b2) * g
        out.append(step_out)
    return out


def optax_lion(optax, h):
    return optax.lion(h["lr"], b1=h["b1"], b2=h["b2"], weight_decay=h["weight_decay"])


ENTRY = Entry(
    defaults=dict(lr=1e-4, b1=0.9, b2=0.99, weight_decay=0.0),
    buffers=("m",),
    step=step,
    first_direction=lambda g, h: np.sign(g),  # c = (1 - b1) g
    scaling=Scaling(eps={}),  # the sign does not see the gradients' scale
    switches=sign_arguments,
    peers=(
        Peer("optax.lion", dict(lr=1e-3, weight_decay=0.1), "optax", optax_lion,
             ("jax", "optax"), bench=("jit",)),
    ),
)
