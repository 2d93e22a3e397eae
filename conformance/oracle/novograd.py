"""NovoGrad's oracle entry (docs/algorithms.md, "NovoGrad")."""

from __future__ import annotations

import math

import numpy as np

from . import Entry, Peer, Scaling, betas

LR, WD = 1e-2, 0.1
TIMM = ("torch", "timm")


def step(t, theta, g, s, h):
    b1, b2, wd = h["b1"], h["b2"], h["weight_decay"]
    norm2 = float(np.sum(g ** 2))
    s["v"] = norm2 if t == 1 else b2 * s["v"] + (1 - b2) * norm2
    bracket = g / (math.sqrt(s["v"]) + h["eps"]) + wd * theta
    if h["grad_averaging"]:
        bracket = (1 - b1) * bracket
    s["m"] = b1 * s["m"] + bracket
    return theta - h["lr"] * s["m"]


def first_direction(g, h):
    """v_1 = |g|^2: the gradient over its norm."""
    return g / (np.sqrt(np.sum(g * g)) + h["eps"]) * ((1 - h["b1"]) if h["grad_averaging"] else 1)


def timm_novograd(params, h, **options):
    from mvn_core.conformance.peers import timm_optim

    return timm_optim("nvnovograd").NvNovoGrad(
        params, lr=h["lr"], betas=betas(h), eps=h["eps"], weight_decay=h["weight_decay"],
        grad_averaging=h["grad_averaging"], **options)


def optax_novograd(optax, h):
    return optax.novograd(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"], eps_root=0.0,
                          weight_decay=h["weight_decay"])


ENTRY = Entry(
    defaults=dict(lr=1e-3, b1=0.95, b2=0.98, eps=1e-8, weight_decay=0.0, grad_averaging=False),
    buffers=("m",),
    tensor_buffers=("v",),
    step=step,
    first_direction=first_direction,
    scaling=Scaling(eps={"eps": 1}),
    peers=(
        Peer("optax.novograd", dict(lr=LR, weight_decay=WD), "optax", optax_novograd,
             ("jax", "optax"), bench=("jit",)),
        Peer("timm NvNovoGrad", dict(lr=LR, weight_decay=WD), "torch", timm_novograd, TIMM,
             bench=("loop",)),
        Peer("timm NvNovoGrad(grad_averaging)", dict(lr=LR, weight_decay=WD, grad_averaging=True),
             "torch", timm_novograd, TIMM),
    ),
)
