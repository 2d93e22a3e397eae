"""Stochastic gradient descent with (Nesterov) momentum, as ``torch.optim.SGD``."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._rule import TensorRule


class SGDState(NamedTuple):
    """SGD's state: the count and, per tensor, the momentum buffer ``b``."""

    count: Any
    b: tuple


def _constants(xp, c):
    return {}


def _direction(xp, g, p, buffers, c):
    (b,) = buffers
    b = c.momentum * b + g
    return (g + c.momentum * b if c.nesterov else b), (b,)


def _check_relations(h):
    if h["nesterov"] and isinstance(h["momentum"], float) and h["momentum"] == 0.0:
        raise ValueError("nesterov=True needs momentum > 0")


SGD = TensorRule("sgd", SGDState, _direction, _constants, check=_check_relations)


def sgd_init(params: Any, *, state_dtype: Any = None) -> SGDState:
    """Zero state for :func:`sgd_update` (``state_dtype``: see :func:`mvn_core.mvn_init`)."""
    return SGD.init(params, state_dtype)


def sgd_update(state: SGDState, grads: Any, params: Any = None, *, lr: Any = 1e-3,
               momentum: Any = 0.0, nesterov: bool = False, weight_decay: Any = 0.0,
               coupled_weight_decay: bool = False):
    """One SGD step.  Returns ``(updates, new_state)``::

        b_t = momentum b + g                  # b_1 = g, as torch
        update = -lr weight_decay theta - lr b_t          (nesterov: -lr (g + momentum b_t))

    ``coupled_weight_decay=True`` adds ``weight_decay * theta`` to ``g`` first, which is
    what ``torch.optim.SGD(weight_decay=...)`` does.  A NaN in ``g`` makes that
    coordinate NaN from then on, an Inf makes it +-Inf (from then on with momentum; NaN
    after that step without); :func:`mvn_core.skip_if_nonfinite` skips such steps instead.
    """
    return SGD.update(state, grads, params, dict(
        lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
        coupled_weight_decay=coupled_weight_decay))
