"""MaxVA: Adam whose second-moment averaging weight is chosen per coordinate and per step
to maximize the estimated variance (Zhu et al., arXiv 2006.11918; the authors' ``MAdam``)."""

from __future__ import annotations

from ._rule import guard, one_minus_power
from .rule import Hyperparameter as H
from .rule import define_rule


def _constants(xp, step):
    return {"inv_bc1": 1 / one_minus_power(xp, step.b1, step.t), "first": step.t == 1,
            "tiny": guard(xp, step.t.dtype, 1e-16),
            "keep_min": 1 - step.b2_max, "keep_max": 1 - step.b2_min}


def _direction(xp, g, p, buffers, step):
    u, v, w, m = buffers
    keep = _new_weight(xp, g, u, v, w, step)
    beta = 1 - keep
    u = beta * u + keep * g
    v = beta * v + keep * (g * g)
    w = beta * w + keep
    m = step.b1 * m + (1 - step.b1) * g
    return (m * step.inv_bc1) / (xp.sqrt(v / w) + step.eps), (u, v, w, m)


def _new_weight(xp, g, u, v, w, step):
    """``1 - beta_t`` per coordinate, for the beta_t that maximizes the estimated variance.

    The same quantity as docs/algorithms.md's, arranged for rounding: ``1 - beta`` is formed
    directly, as ``(w (d2 - var) + 1e-16) / den``, because forming beta and subtracting
    it from one would lose the digits that matter near b2_max (1e-5 relative in float32
    at 0.999); ``den`` is written as a sum of non-negative terms, so it cannot cancel to
    zero or below; ``var`` is clipped at zero and ``w`` at one, bounds that hold in exact
    arithmetic.  A state that has overflowed (``v = inf``) gets b2_max instead of NaN.
    """
    w_safe = xp.where(w > 0, w, xp.ones_like(w))  # w is 0 only before the first step
    mean = u / w_safe
    var = xp.clip(v / w_safe - mean * mean, min=0.0)
    d2 = (g - mean) * (g - mean)
    w = xp.clip(w, max=1.0)
    ratio = (w * (d2 - var) + step.tiny) / (d2 * (1 + w) + var * (1 - w) + step.tiny)
    keep = xp.clip(ratio, min=step.keep_min, max=step.keep_max)
    fallback = xp.zeros_like(keep) + step.keep_min
    return xp.where(step.first | ~xp.isfinite(ratio), fallback, keep)


def _check_relations(h):
    if isinstance(h["b2_min"], float) and isinstance(h["b2_max"], float) \
            and h["b2_min"] > h["b2_max"]:
        raise ValueError(f"b2_min={h['b2_min']!r} is larger than b2_max={h['b2_max']!r}")


MAXVA = define_rule(
    "maxva", title="MaxVA", class_name="MaxVA",
    reference="Zhu et al., arXiv 2006.11918 (2020)",
    direction=_direction,
    constants=_constants,
    check=_check_relations,
    buffers=("u", "v", "w", "m"),
    hyperparameters={
        "lr": H(1e-3),
        "b1": H(0.9, "unit"),
        "b2_min": H(0.5, "unit"),
        "b2_max": H(0.999, "unit"),
        "eps": H(1e-8, "eps"),
        "weight_decay": H(0.0),
    },
    betas=("b1", "b2_max"),
    settings=({}, {"weight_decay": 0.1}, {"b2_min": 0.9, "b2_max": 0.99}),
    memories=("b1", "b2_max"),  # the averaging weight of u, v, w is at most b2_max
    order=20,
    doc="""One MaxVA step.  Returns ``(updates, new_state)``.  Per coordinate::

        mean = u / w,  var = v / w - mean^2,  d2 = (g - mean)^2
        beta = clip((d2 + var) / (w (d2 - var) + d2 + var + 1e-16), b2_min, b2_max)
        beta = b2_max on the first step (w_0 = 0)
        u_t = beta u + (1 - beta) g ;  v_t = beta v + (1 - beta) g^2 ;  w_t = beta w + (1 - beta)
        m_t = b1 m + (1 - b1) g
        update = -lr weight_decay theta - lr / (1 - b1^t) * m_t / (sqrt(v_t / w_t) + eps)

    ``b2_min == b2_max == b2`` makes it Adam/AdamW (``w_t = 1 - b2^t``).  Computed with
    ``1 - beta`` as the primary quantity and a denominator that cannot cancel (the same
    in exact arithmetic, far more accurate in float32; see ``_new_weight``).  Since
    ``var >= 0`` and ``w <= 1``, ``1 - beta <= 1/2`` before clipping: a ``b2_min`` at or
    below 0.5 only binds where ``d2 = var = 0``.  In float32, where the mean of the
    gradients is 1e3 times their spread or more, ``var`` is mostly rounding and the
    choice of beta is noise (float64 holds to about 1e11).

    A NaN or an Inf in ``g`` makes that coordinate's update and state NaN from then on
    (nothing else); :func:`mvn_core.skip_if_nonfinite` skips such steps instead.
    """,
)
MaxVAState = MAXVA.state_type
maxva_init = MAXVA.init
maxva_update = MAXVA.update
