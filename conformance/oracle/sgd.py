"""SGD's oracle entry (docs/algorithms.md, "SGD with momentum": torch.optim.SGD's)."""

from __future__ import annotations

from . import Entry, Peer, Scaling

LR, WD = 1e-2, 0.1
MOMENTUM = dict(lr=LR, momentum=0.9)


def step(t, theta, g, s, h):
    lr, mu, wd = h["lr"], h["momentum"], h["weight_decay"]
    if h["coupled_weight_decay"]:
        g = g + wd * theta
    s["b"] = g.copy() if t == 1 else mu * s["b"] + g
    update = g + mu * s["b"] if h["nesterov"] else s["b"]
    decay = 0.0 if h["coupled_weight_decay"] else lr * wd * theta
    return theta - decay - lr * update


def torch_sgd(params, h, **options):
    import torch

    return torch.optim.SGD(params, lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"],
                           weight_decay=h["weight_decay"], **options)


def optax_sgd(optax, h):
    return optax.sgd(h["lr"], momentum=h["momentum"], nesterov=h["nesterov"])


ENTRY = Entry(
    defaults=dict(lr=1e-3, momentum=0.0, nesterov=False, weight_decay=0.0,
                  coupled_weight_decay=False),
    buffers=("b",),
    step=step,
    first_direction=lambda g, h: (1 + h["momentum"]) * g if h["nesterov"] else g,  # b_1 = g
    scaling=Scaling(eps={}, updates=1),
    peers=(
        Peer("torch.optim.SGD", MOMENTUM, "torch", torch_sgd, ("torch",), bench=("foreach",)),
        Peer("torch.optim.SGD(nesterov, weight_decay)",
             dict(MOMENTUM, nesterov=True, weight_decay=WD, coupled_weight_decay=True), "torch",
             torch_sgd, ("torch",)),
        Peer("optax.sgd", MOMENTUM, "optax", optax_sgd, ("jax", "optax"), bench=("jit",)),
        Peer("optax.sgd(nesterov)", dict(MOMENTUM, nesterov=True), "optax", optax_sgd,
             ("jax", "optax")),
    ),
)
