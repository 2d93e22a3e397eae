"""LaProp: Adam with the normalization before the momentum (Ziyin, Wang, Ueda,
arXiv 2002.04839)."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._rule import TensorRule, bias_corrections


class LaPropState(NamedTuple):
    """LaProp's state: the step count and, per tensor, ``m`` and ``v``."""

    count: Any
    m: tuple
    v: tuple


def _direction(xp, g, p, buffers, c):
    m, v = buffers
    v = c.b2 * v + (1 - c.b2) * (g * g)
    m = c.b1 * m + (1 - c.b1) * (g / (xp.sqrt(v * c.inv_bc2) + c.eps))
    return m * c.inv_bc1, (m, v)


LAPROP = TensorRule("laprop", LaPropState, _direction, bias_corrections)


def laprop_init(params: Any, *, state_dtype: Any = None) -> LaPropState:
    """Zero state for :func:`laprop_update` (``state_dtype``: see :func:`mvn_core.mvn_init`)."""
    return LAPROP.init(params, state_dtype)


def laprop_update(state: LaPropState, grads: Any, params: Any = None, *, lr: Any = 4e-4,
                  b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-15, weight_decay: Any = 0.0):
    """One LaProp step.  Returns ``(updates, new_state)``::

        v_t = b2 v + (1 - b2) g^2
        m_t = b1 m + (1 - b1) g / (sqrt(v_t / (1 - b2^t)) + eps)
        update = -lr weight_decay theta - lr m_t / (1 - b1^t)

    ``g / eps`` bounds the normalized gradient where ``v`` underflows (``eps >= 2**-64``
    keeps it finite).  A NaN or an Inf in ``g`` makes that coordinate's update and state
    NaN from then on (nothing else); :func:`mvn_core.skip_if_nonfinite` skips such steps
    instead.
    """
    return LAPROP.update(state, grads, params, dict(
        lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
