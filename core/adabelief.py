"""AdaBelief: Adam with the variance of the gradient around its mean (Zhuang et al.,
arXiv 2010.07468), optionally rectified as in RAdam (Liu et al., arXiv 1908.03265)."""

from __future__ import annotations

from ._rule import bias_corrections
from .rule import Hyperparameter as H
from .rule import define_rule


def _constants(xp, step):
    out = bias_corrections(xp, step)
    if step.rectify:
        out.update(_rectification(xp, step, out["bc1"], out["bc2"]))
    return out


def _rectification(xp, step, bc1, bc2):
    """RAdam's variance rectification, as in the official ``adabelief-pytorch``."""
    rho_inf = 2 / (1 - step.b2) - 1
    rho = rho_inf - 2 * step.t * (1 - bc2) / bc2
    rectified = rho >= 5

    def where_rectified(x):  # elsewhere the ratio is unused: keep it finite there
        x = x + xp.zeros_like(rho)
        return xp.where(rectified, x, xp.ones_like(x))

    # A product of three bounded ratios: rho_inf reaches 2**54 as b2 nears 1 and rho_t
    # grows with the count, so the products of three of them in one quotient overflowed
    # float32 at late counts (Inf / Inf).
    ratio = ((rho - 4) / where_rectified(rho_inf - 4) * ((rho - 2) / where_rectified(rho_inf - 2))
             * (rho_inf / where_rectified(rho)))
    scale = xp.sqrt(xp.clip(ratio * bc2, min=0.0)) / bc1
    return {"rectified": rectified, "rect_scale": scale}


def _direction(xp, g, p, buffers, step):
    m, s = buffers
    m = step.b1 * m + (1 - step.b1) * g
    r = g - m
    s = step.b2 * s + (1 - step.b2) * (r * r) + step.eps
    if not step.rectify:
        return (m * step.inv_bc1) / (xp.sqrt(s * step.inv_bc2) + step.eps), (m, s)
    rectified = step.rect_scale * m / (xp.sqrt(s) + step.eps)
    return xp.where(step.rectified, rectified, m * step.inv_bc1), (m, s)


ADABELIEF = define_rule(
    "adabelief", title="AdaBelief", class_name="AdaBelief",
    reference="Zhuang et al., arXiv 2010.07468 (2020)",
    direction=_direction,
    constants=_constants,
    buffers=("m", "s"),
    hyperparameters={
        "lr": H(1e-3),
        "b1": H(0.9, "unit"),
        "b2": H(0.999, "unit"),
        "eps": H(1e-16, "eps"),
        "weight_decay": H(0.0),
        "rectify": H(False, "flag"),
    },
    betas=("b1", "b2"),
    settings=({}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "rectify": True}),
    memories=("b1", "b2"),
    order=50,
    doc="""One AdaBelief step.  Returns ``(updates, new_state)``::

        m_t = b1 m + (1 - b1) g
        s_t = b2 s + (1 - b2) (g - m_t)^2 + eps        # eps stored in s every step
        update = -lr weight_decay theta - lr (m_t / (1 - b1^t)) / (sqrt(s_t / (1 - b2^t)) + eps)

    ``rectify=True`` is the RAdam-style variant of ``adabelief-pytorch``: with
    ``rho_inf = 2 / (1 - b2) - 1`` and ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``, steps
    with ``rho_t >= 5`` use ``r_t sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(s_t) + eps)``
    where ``r_t^2 = (rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t)``,
    and earlier steps the momentum ``m_t / (1 - b1^t)`` alone.  In the first rectified
    steps ``rho_t`` is a small difference of two numbers near ``2 / (1 - b2)``, so in
    float32 the rectified step size is only accurate to about 1e-4 relative there; the
    ratio ``r_t^2`` is formed as a product of three bounded ratios, which cannot overflow.
    A NaN or an Inf in ``g`` makes that coordinate's update and state NaN from then on
    (nothing else); :func:`mvn_core.skip_if_nonfinite` skips such steps instead.
    """,
)
AdaBeliefState = ADABELIEF.state_type
adabelief_init = ADABELIEF.init
adabelief_update = ADABELIEF.update
