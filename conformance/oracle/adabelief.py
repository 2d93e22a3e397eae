"""AdaBelief's oracle entry (docs/algorithms.md, "AdaBelief")."""

from __future__ import annotations

import decimal

import numpy as np

from . import Entry, Peer
from ._peers import official_adabelief, timm_adabelief

LR, WD = 1e-2, 0.1
TIMM, OFFICIAL = ("torch", "timm"), ("torch", "adabelief_pytorch")


def step(t, theta, g, s, h):
    lr, b1, b2, wd, eps = h["lr"], h["b1"], h["b2"], h["weight_decay"], h["eps"]
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["s"] = b2 * s["s"] + (1 - b2) * (g - s["m"]) ** 2 + eps
    theta = theta - lr * wd * theta
    if not h["rectify"]:
        return theta - lr * (s["m"] / (1 - b1 ** t)) / (np.sqrt(s["s"] / (1 - b2 ** t)) + eps)
    # RAdam-style, as the official adabelief-pytorch (degenerating to SGD early on)
    rho, factor = rectification(b2, t)
    if rho >= 5:
        return theta - lr * factor / (1 - b1 ** t) * s["m"] / (np.sqrt(s["s"]) + eps)
    return theta - lr * s["m"] / (1 - b1 ** t)


def rectification(b2, t):
    """RAdam's ``rho_t`` and ``sqrt((1 - b2^t) r_t^2)``, computed with 50 significant
    digits: ``rho_t`` is a small difference of large numbers, and the reference must
    not carry the rounding error it would have in double precision."""
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        b2 = decimal.Decimal(b2)
        power = b2 ** t
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * power / (1 - power)
        if rho < 5:
            return float(rho), 0.0
        r2 = (1 - power) * (rho - 4) / (rho_inf - 4) * (rho - 2) / rho * rho_inf / (rho_inf - 2)
        return float(rho), float(r2.sqrt())


def rectification_rounding(h, t):
    """The relative error, in eps, of the rule's rectified step size at step ``t`` (0
    before, and without rectification): ``rho_t`` is a small difference of two numbers
    near ``rho_inf = 2 / (1 - b2) - 1``, each carrying ~3 eps, so it is off by up to
    ``6 eps rho_inf``, and the step size (a square root of a product of ``rho_t - 4``,
    ``rho_t - 2`` and ``1 / rho_t``) by half the sum of those relative errors."""
    if not h.get("rectify", False):
        return 0.0
    b2 = h["b2"]
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    rho = rho_inf - 2.0 * t * b2 ** t / (1.0 - b2 ** t)
    if rho < 5:
        return 0.0
    return 3.0 * rho_inf * (1.0 / (rho - 4.0) + 1.0 / (rho - 2.0) + 1.0 / rho)


def first_direction(g, h):
    """As MVN-Grad's: s_1 = (1 - b2) b1^2 g^2 + eps (rectification: plain momentum)."""
    if h.get("rectify", False):
        return g
    return g / (np.sqrt(h["b1"] ** 2 * g * g + h["eps"] / (1 - h["b2"])) + h["eps"])


def optax_adabelief(optax, h):
    return optax.chain(optax.scale_by_belief(h["b1"], h["b2"], eps=h["eps"], eps_root=h["eps"]),
                       optax.add_decayed_weights(h["weight_decay"]),
                       optax.scale_by_learning_rate(h["lr"]))


ENTRY = Entry(
    defaults=dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-16, weight_decay=0.0, rectify=False),
    buffers=("m", "s"),
    step=step,
    first_direction=first_direction,
    first_direction_error=lambda h: 1.0 / h["b1"] if h["b1"] > 0 else 1.0,
    rounding=rectification_rounding,
    peers=(
        Peer("optax.scale_by_belief + add_decayed_weights", dict(lr=LR, weight_decay=WD),
             "optax", optax_adabelief, ("jax", "optax"), bias_corrected=("b1", "b2"),
             bench=("jit",)),
        Peer("timm AdaBelief", dict(lr=LR, weight_decay=WD), "torch", timm_adabelief, TIMM,
             bias_corrected=("b1", "b2"), bench=("foreach",)),
        Peer("adabelief_pytorch.AdaBelief", dict(lr=LR, weight_decay=WD), "torch",
             official_adabelief, OFFICIAL, bias_corrected=("b1", "b2"), bench=("loop",)),
        Peer("adabelief_pytorch.AdaBelief(rectify)", dict(lr=LR, weight_decay=WD, rectify=True),
             "torch", official_adabelief, OFFICIAL, bias_corrected=("b1", "b2")),
    ),
)
