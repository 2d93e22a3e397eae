"""A float64 reference for every rule, written from docs/algorithms.md alone.

It shares no code with ``mvn_core`` (it does not import it) and is written in a
different style on purpose: plain NumPy float64, one explicit function per rule, the
first-step cases as Python ``if``s, bias corrections as ``1 - b**t`` in double
precision, no rounding guards.  Agreement between the two is therefore evidence that
both follow the document, not that they share a mistake.
"""

from __future__ import annotations

import decimal
import math

import numpy as np

# The defaults of docs/algorithms.md, restated here so that a test can compare them with the
# core's signatures.  (SGD's are not in the document: they are torch.optim.SGD's.)
DEFAULTS = {
    "mvn": dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, eps_s=1e-16, weight_decay=0.0,
                coupled_weight_decay=False),
    "gan": dict(center="tensor", scale="global_std"),
    "maxva": dict(lr=1e-3, b1=0.9, b2_min=0.5, b2_max=0.999, eps=1e-8, weight_decay=0.0),
    "novograd": dict(lr=1e-3, b1=0.95, b2=0.98, eps=1e-8, weight_decay=0.0,
                     grad_averaging=False),
    "adam": dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                 coupled_weight_decay=False),
    "adabelief": dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-16, weight_decay=0.0, rectify=False),
    "laprop": dict(lr=4e-4, b1=0.9, b2=0.999, eps=1e-15, weight_decay=0.0),
    "sgd": dict(lr=1e-3, momentum=0.0, nesterov=False, weight_decay=0.0,
                coupled_weight_decay=False),
}


def _mvn(t, theta, g, s, h):
    lr, b1, b2, wd = h["lr"], h["b1"], h["b2"], h["weight_decay"]
    if h["coupled_weight_decay"]:
        g = g + wd * theta
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["v"] = b2 * s["v"] + (1 - b2) * (g - s["m"]) ** 2 + h["eps_s"]
    z = g / (np.sqrt(s["v"] / (1 - b2 ** t)) + h["eps"])
    s["u"] = b1 * s["u"] + (1 - b1) * z
    decay = 0.0 if h["coupled_weight_decay"] else lr * wd * theta
    return theta - decay - lr * s["u"] / (1 - b1 ** t)


def _adam(t, theta, g, s, h):
    lr, b1, b2, wd = h["lr"], h["b1"], h["b2"], h["weight_decay"]
    if h["coupled_weight_decay"]:
        g = g + wd * theta
    s["m"] = b1 * s["m"] + (1 - b1) * g
    s["v"] = b2 * s["v"] + (1 - b2) * g ** 2
    mhat = s["m"] / (1 - b1 ** t)
    step = mhat / (np.sqrt(s["v"]) / math.sqrt(1 - b2 ** t) + h["eps"])
    decay = 0.0 if h["coupled_weight_decay"] else lr * wd * theta
    return theta - decay - lr * step


def _laprop(t, theta, g, s, h):
    lr, b1, b2, wd = h["lr"], h["b1"], h["b2"], h["weight_decay"]
    s["v"] = b2 * s["v"] + (1 - b2) * g ** 2
    s["m"] = b1 * s["m"] + (1 - b1) * g / (np.sqrt(s["v"] / (1 - b2 ** t)) + h["eps"])
    return theta - lr * wd * theta - lr * s["m"] / (1 - b1 ** t)


def _adabelief(t, theta, g, s, h):
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


def _maxva(t, theta, g, s, h):
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
    step = s["m"] / (np.sqrt(s["v"] / s["w"]) + h["eps"])
    return theta - lr * wd * theta - lr / (1 - b1 ** t) * step


def _novograd(t, theta, g, s, h):
    b1, b2, wd = h["b1"], h["b2"], h["weight_decay"]
    norm2 = float(np.sum(g ** 2))
    s["v"] = norm2 if t == 1 else b2 * s["v"] + (1 - b2) * norm2
    bracket = g / (math.sqrt(s["v"]) + h["eps"]) + wd * theta
    if h["grad_averaging"]:
        bracket = (1 - b1) * bracket
    s["m"] = b1 * s["m"] + bracket
    return theta - h["lr"] * s["m"]


def _sgd(t, theta, g, s, h):
    lr, mu, wd = h["lr"], h["momentum"], h["weight_decay"]
    if h["coupled_weight_decay"]:
        g = g + wd * theta
    s["b"] = g.copy() if t == 1 else mu * s["b"] + g
    step = g + mu * s["b"] if h["nesterov"] else s["b"]
    decay = 0.0 if h["coupled_weight_decay"] else lr * wd * theta
    return theta - decay - lr * step


_STEPS = {"mvn": _mvn, "adam": _adam, "laprop": _laprop, "adabelief": _adabelief,
          "maxva": _maxva, "novograd": _novograd, "sgd": _sgd}
_BUFFERS = {"mvn": "muv", "adam": "mv", "laprop": "mv", "adabelief": "ms", "maxva": "uvwm",
            "novograd": "mv", "sgd": "b"}


def gan(grads, center="tensor", scale="global_std"):
    """docs/algorithms.md, "GAN" on one step's list of gradients (float64)."""
    return gan_with_scale(grads, center, scale)[0]


def gan_with_scale(grads, center="tensor", scale="global_std"):
    """:func:`gan`'s output and the global factor alpha it used (None: nothing eligible)."""
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


def trajectory(rule, params, grads_per_step, **hyper):
    """Run ``rule`` from ``params`` over the list of per-step gradient lists.

    Returns the parameters after each step (a list, per step, of float64 arrays).  For
    ``"gan"`` it returns each step's transformed gradients instead.
    """
    h = dict(DEFAULTS[rule], **hyper)
    if rule == "gan":
        return [gan(g, h["center"], h["scale"]) for g in grads_per_step]
    theta = [np.array(p, dtype=np.float64) for p in params]
    states = [{k: (0.0 if rule == "novograd" and k == "v" else np.zeros_like(p))
               for k in _BUFFERS[rule]} for p in theta]
    out = []
    for t, grads in enumerate(grads_per_step, start=1):
        theta = [_STEPS[rule](t, p, np.asarray(g, dtype=np.float64), s, h)
                 for p, g, s in zip(theta, grads, states)]
        out.append([np.array(p) for p in theta])
    return out
