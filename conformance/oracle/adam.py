"""Adam's oracle entry (docs/algorithms.md, "Adam / AdamW")."""

from __future__ import annotations

import math

import numpy as np

from . import Entry, Peer, Scaling, betas

LR, WD = 1e-2, 0.1
TORCH, OPTAX = ("torch",), ("jax", "optax")


def step(t, theta, g, s, h):
    lr, b1, b2, wd = h["lr"], h["b1"], h["b2"], h["weight_decay"]
    if h["coupled_weight_decay"]:
        g = g + wd * theta
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["v"] = b2 * s["v"] + (1 - b2) * g ** 2
    mhat = s["m"] / (1 - b1 ** t)
    update = mhat / (np.sqrt(s["v"]) / math.sqrt(1 - b2 ** t) + h["eps"])
    decay = 0.0 if h["coupled_weight_decay"] else lr * wd * theta
    return theta - decay - lr * update


def torch_adam(params, h, **options):
    import torch

    return torch.optim.Adam(params, lr=h["lr"], betas=betas(h), eps=h["eps"],
                            weight_decay=h["weight_decay"], **options)


def torch_adamw(params, h, **options):
    import torch

    return torch.optim.AdamW(params, lr=h["lr"], betas=betas(h), eps=h["eps"],
                             weight_decay=h["weight_decay"], **options)


def optax_adam(optax, h):
    return optax.adam(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"], eps_root=0.0)


def optax_adamw(optax, h):
    return optax.adamw(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"], eps_root=0.0,
                       weight_decay=h["weight_decay"])


ENTRY = Entry(
    defaults=dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                  coupled_weight_decay=False),
    buffers=("m", "v"),
    step=step,
    first_direction=lambda g, h: g / (np.abs(g) + h["eps"]),  # m/(1-b1) = g, sqrt(v/(1-b2)) = |g|
    scaling=Scaling(eps={"eps": 1}),
    peers=(
        Peer("torch.optim.Adam", dict(lr=LR), "torch", torch_adam, TORCH,
             bias_corrected=("b1", "b2"), bench=("fused", "foreach")),
        Peer("torch.optim.Adam(weight_decay) (L2)",
             dict(lr=LR, weight_decay=WD, coupled_weight_decay=True), "torch", torch_adam, TORCH,
             bias_corrected=("b1", "b2")),
        Peer("torch.optim.AdamW", dict(lr=LR, weight_decay=WD), "torch", torch_adamw, TORCH,
             bias_corrected=("b1", "b2"), bench=("fused", "foreach")),
        Peer("optax.adam", dict(lr=LR), "optax", optax_adam, OPTAX, bias_corrected=("b1", "b2"),
             bench=("jit",)),
        Peer("optax.adamw", dict(lr=LR, weight_decay=WD), "optax", optax_adamw, OPTAX,
             bias_corrected=("b1", "b2"), bench=("jit",)),
    ),
)
