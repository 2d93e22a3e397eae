"""MVN-Grad's oracle entry (docs/algorithms.md, "MVN-Grad")."""

from __future__ import annotations

import functools

import numpy as np

from . import Entry, Peer, Scaling
from ._peers import official_adabelief, optax_belief_variance, timm_adabelief, timm_laprop

LR = 1e-2
# Its variance relation is checked with distinct betas and a visible eps_s.
VARIANCE = dict(lr=LR, b1=0.8, b2=0.95, eps_s=1e-12)
TORCH, OPTAX = ("torch",), ("jax", "optax")
TIMM, OFFICIAL = ("torch", "timm"), ("torch", "adabelief_pytorch")


def step(t, theta, g, s, h):
    lr, b1, b2, wd = h["lr"], h["b1"], h["b2"], h["weight_decay"]
    if h["coupled_weight_decay"]:
        g = g + wd * theta
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["v"] = b2 * s["v"] + (1 - b2) * (g - s["m"]) ** 2 + h["eps_s"]
    z = g / (np.sqrt(s["v"] / (1 - b2 ** t)) + h["eps"])
    s["u"] = b1 * s["u"] + (1 - b1) * z
    decay = 0.0 if h["coupled_weight_decay"] else lr * wd * theta
    return theta - decay - lr * s["u"] / (1 - b1 ** t)


def first_direction(g, h):
    """g - m_1 = b1 g, so v_1 = (1 - b2) b1^2 g^2 + eps_s."""
    return g / (np.sqrt(h["b1"] ** 2 * g * g + h["eps_s"] / (1 - h["b2"])) + h["eps"])


def as_laprop(mvn_core, problem, dtype, **hyper):
    """MVN-Grad driven so that its variance sees ``g^2`` instead of ``(g - m)^2``.

    Before each step the state's mean is set to ``m = -(1 - b1) / b1 * g``, so that
    the rule's own ``m_t = b1 m + (1 - b1) g`` is zero (to rounding; exactly zero when
    ``(1 - b1) / b1`` is a power of two, e.g. ``b1 = 0.5``) and ``(g - m_t)^2 = g^2``.
    With ``eps_s = 0`` the rule's remaining equations are LaProp's, its ``u`` being
    LaProp's momentum: the parameters after each step.
    """
    rule = mvn_core.rules["mvn"]
    b1 = hyper.get("b1", rule.defaults["b1"])
    params = [np.asarray(p, dtype=dtype) for p in problem.params]
    state = rule.init(params)
    out = []
    for grads in problem.grads:
        grads = [np.asarray(g, dtype=dtype) for g in grads]
        state = state._replace(m=tuple(-(1 - b1) / b1 * g for g in grads))
        updates, state = rule.update(state, grads, params, **hyper)
        params = mvn_core.apply_updates(params, updates)
        out.append([np.asarray(p, dtype=np.float64) for p in params])
    return out


ENTRY = Entry(
    defaults=dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, eps_s=1e-16, weight_decay=0.0,
                  coupled_weight_decay=False),
    buffers=("m", "u", "v"),
    step=step,
    first_direction=first_direction,
    first_direction_error=lambda h: 1.0 / h["b1"] if h["b1"] > 0 else 1.0,
    scaling=Scaling(eps={"eps": 1, "eps_s": 2}),
    # u holds the normalized gradient g / sqrt(v), as large as g / sqrt(eps_s) when the
    # residual variance vanishes (claim 3 of its paper), whatever the gradients' size.
    half_state=False,
    peers=(
        Peer("optax.scale_by_belief(eps=0, eps_root=eps_s): nu", VARIANCE, "optax",
             optax_belief_variance, OPTAX, state=("v", "nu"),
             note="MVN-Grad's v is AdaBelief's second moment"),
        Peer("timm LaProp (MVN-Grad with (g-m)^2 -> g^2, eps_s=0)",
             dict(lr=4e-3, eps=1e-15, eps_s=0.0), "torch", timm_laprop, TIMM, core=as_laprop,
             bias_corrected=("b1", "b2"), scalars_in_run_dtype=True, model_rule="laprop",
             note="MVN-Grad's reduction to LaProp, driven with a crafted mean"),
        Peer("timm AdaBelief(eps=eps_s): exp_avg_var", VARIANCE, "torch",
             functools.partial(timm_adabelief, eps="eps_s"), TIMM, state=("v", "exp_avg_var"),
             note="MVN-Grad's v is AdaBelief's second moment"),
        Peer("adabelief_pytorch.AdaBelief(eps=eps_s): exp_avg_var", VARIANCE, "torch",
             functools.partial(official_adabelief, eps="eps_s"), OFFICIAL,
             state=("v", "exp_avg_var"), note="MVN-Grad's v is AdaBelief's second moment"),
    ),
)
