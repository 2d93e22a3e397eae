"""Adam, and AdamW through decoupled weight decay (Kingma & Ba, arXiv 1412.6980;
Loshchilov & Hutter, arXiv 1711.05101)."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._rule import TensorRule, bias_corrections


class AdamState(NamedTuple):
    """Adam's state: the step count and, per tensor, the moments ``m`` and ``v``."""

    count: Any
    m: tuple
    v: tuple


def _constants(xp, c):
    corrections = bias_corrections(xp, c)
    return {"inv_bc1": corrections["inv_bc1"], "inv_sqrt_bc2": 1 / xp.sqrt(corrections["bc2"])}


def _direction(xp, g, p, buffers, c):
    m, v = buffers
    m = c.b1 * m + (1 - c.b1) * g
    v = c.b2 * v + (1 - c.b2) * (g * g)
    return (m * c.inv_bc1) / (xp.sqrt(v) * c.inv_sqrt_bc2 + c.eps), (m, v)


ADAM = TensorRule("adam", AdamState, _direction, _constants)


def adam_init(params: Any, *, state_dtype: Any = None) -> AdamState:
    """Zero state for :func:`adam_update` (``state_dtype``: see :func:`mvn_core.mvn_init`)."""
    return ADAM.init(params, state_dtype)


def adam_update(state: AdamState, grads: Any, params: Any = None, *, lr: Any = 1e-3,
                b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-8, weight_decay: Any = 0.0,
                coupled_weight_decay: bool = False):
    """One Adam/AdamW step.  Returns ``(updates, new_state)``::

        m_t = b1 m + (1 - b1) g
        v_t = b2 v + (1 - b2) g^2
        update = -lr weight_decay theta - lr (m_t / (1 - b1^t)) / (sqrt(v_t) / sqrt(1 - b2^t) + eps)

    Weight decay is decoupled (AdamW); ``coupled_weight_decay=True`` gives
    ``torch.optim.Adam(weight_decay=...)`` semantics (``g += weight_decay * theta``).
    After a spike, ``v`` may underflow while ``m`` has not: the step is then ``m / eps``,
    finite for ``eps >= 2**-64`` (the range check's floor).

    A NaN or an Inf in ``g`` makes that coordinate's update and state NaN from then on
    (nothing else); :func:`mvn_core.skip_if_nonfinite` skips such steps instead.
    """
    return ADAM.update(state, grads, params, dict(
        lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        coupled_weight_decay=coupled_weight_decay))
