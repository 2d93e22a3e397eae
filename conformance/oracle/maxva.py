"""MaxVA's oracle entry (docs/algorithms.md, "MaxVA")."""

from __future__ import annotations

import numpy as np

from . import Entry, Peer, betas

LR, WD = 1e-2, 0.1


def step(t, theta, g, s, h):
    lr, b1, wd = h["lr"], h["b1"], h["weight_decay"]
    lo, hi = h["b2_min"], h["b2_max"]
    if t == 1:
        beta = np.full_like(g, hi)
    else:
        ubar, vbar = s["u"] / s["w"], s["v"] / s["w"]
        sigma2 = vbar - ubar ** 2
        delta2 = (g - ubar) ** 2
        raw = (delta2 + sigma2) / (s["w"] * (delta2 - sigma2) + delta2 + sigma2 + 1e-16)
        beta = np.clip(raw, lo, hi)
    s["u"] = beta * s["u"] + (1 - beta) * g
    s["v"] = beta * s["v"] + (1 - beta) * g ** 2
    s["w"] = beta * s["w"] + (1 - beta)
    s["m"] = b1 * s["m"] + (1 - b1) * g
    update = s["m"] / (np.sqrt(s["v"] / s["w"]) + h["eps"])
    return theta - lr * wd * theta - lr / (1 - b1 ** t) * update


def torch_adamw(params, h, **options):
    """AdamW with b2 = b2_max: MaxVA's exact reduction when b2_min = b2_max."""
    import torch

    return torch.optim.AdamW(params, lr=h["lr"], betas=betas(h, "b1", "b2_max"), eps=h["eps"],
                             weight_decay=h["weight_decay"], **options)


ENTRY = Entry(
    defaults=dict(lr=1e-3, b1=0.9, b2_min=0.5, b2_max=0.999, eps=1e-8, weight_decay=0.0),
    buffers=("u", "v", "w", "m"),
    step=step,
    first_direction=lambda g, h: g / (np.abs(g) + h["eps"]),  # beta_1 = b2_max: Adam's first step
    peers=(
        Peer("torch.optim.AdamW (b2_min = b2_max = b2)",
             dict(lr=LR, b2_min=0.99, b2_max=0.99, weight_decay=WD), "torch", torch_adamw,
             ("torch",), bias_corrected=("b1", "b2_max"), note="MaxVA's exact reduction to Adam"),
    ),
)
