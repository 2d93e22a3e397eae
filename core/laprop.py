"""LaProp: Adam with the normalization before the momentum (Ziyin, Wang, Ueda,
arXiv 2002.04839)."""

from __future__ import annotations

from ._rule import bias_corrections
from .rule import Hyperparameter as H
from .rule import define_rule


def _direction(xp, g, p, buffers, step):
    m, v = buffers
    v = step.b2 * v + (1 - step.b2) * (g * g)
    m = step.b1 * m + (1 - step.b1) * (g / (xp.sqrt(v * step.inv_bc2) + step.eps))
    return m * step.inv_bc1, (m, v)


LAPROP = define_rule(
    "laprop", title="LaProp", class_name="LaProp",
    reference="Ziyin et al., arXiv 2002.04839 (2020)",
    direction=_direction,
    constants=bias_corrections,
    buffers=("m", "v"),
    hyperparameters={
        "lr": H(4e-4),
        "b1": H(0.9, "unit"),
        "b2": H(0.999, "unit"),
        "eps": H(1e-15, "eps"),
        "weight_decay": H(0.0),
    },
    betas=("b1", "b2"),
    settings=({}, {"weight_decay": 0.1}),
    memories=("b1", "b2"),
    order=60,
    doc="""One LaProp step.  Returns ``(updates, new_state)``::

        v_t = b2 v + (1 - b2) g^2
        m_t = b1 m + (1 - b1) g / (sqrt(v_t / (1 - b2^t)) + eps)
        update = -lr weight_decay theta - lr m_t / (1 - b1^t)

    ``g / eps`` bounds the normalized gradient where ``v`` underflows (``eps >= 2**-64``
    keeps it finite).  A NaN or an Inf in ``g`` makes that coordinate's update and state
    NaN from then on (nothing else); :func:`mvn_core.skip_if_nonfinite` skips such steps
    instead.
    """,
)
LaPropState = LAPROP.state_type
laprop_init = LAPROP.init
laprop_update = LAPROP.update
