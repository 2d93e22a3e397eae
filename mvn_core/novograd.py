"""NovoGrad: a second moment per tensor, momentum on the normalized gradient
(Ginsburg et al., arXiv 1905.11286)."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._rule import TensorRule


class NovoGradState(NamedTuple):
    """NovoGrad's state: the count, ``m`` per tensor and ``v`` (one 0-d array per tensor)."""

    count: Any
    m: tuple
    v: tuple


def _constants(xp, c):
    return {"first": c.t == 1}


def _squared_norm(xp, g):
    return xp.sum(g * g)


def _direction(xp, g, p, buffers, c, norm2):
    m, v = buffers
    v = xp.where(c.first, norm2, c.b2 * v + (1 - c.b2) * norm2)
    x = g / (xp.sqrt(v) + c.eps)
    if p is not None:
        x = x + c.weight_decay * p
    if c.grad_averaging:
        x = (1 - c.b1) * x
    m = c.b1 * m + x
    return m, (m, v)


NOVOGRAD = TensorRule("novograd", NovoGradState, _direction, _constants,
                      scalar_buffers=frozenset({"v"}), decay_inside=True,
                      statistic=_squared_norm)


def novograd_init(params: Any, *, state_dtype: Any = None) -> NovoGradState:
    """Zero state for :func:`novograd_update` (``state_dtype``: see :func:`mvn_core.mvn_init`)."""
    return NOVOGRAD.init(params, state_dtype)


def novograd_update(state: NovoGradState, grads: Any, params: Any = None, *, lr: Any = 1e-3,
                    b1: Any = 0.95, b2: Any = 0.98, eps: Any = 1e-8, weight_decay: Any = 0.0,
                    grad_averaging: bool = False):
    """One NovoGrad step.  Returns ``(updates, new_state)``.  Per tensor::

        v_1 = ||g_1||^2 ;  v_t = b2 v + (1 - b2) ||g_t||^2  (t >= 2)
        m_t = b1 m + (g / (sqrt(v_t) + eps) + weight_decay theta)
        update = -lr m_t

    No bias correction (the first step's initialisation replaces it); weight decay
    enters the momentum.  ``grad_averaging=True`` multiplies the bracket by ``1 - b1``.
    The norm is taken over the whole (logical) tensor; on arrays sharded over
    processes the norms of all tensors are combined in one collective.  A NaN in ``g``
    makes the whole tensor's update and state NaN from then on; an Inf makes ``v`` Inf,
    that coordinate NaN and the rest of the tensor's normalized gradient 0 from then on
    (it steps on its momentum and weight decay alone).  :func:`mvn_core.skip_if_nonfinite`
    skips such steps instead.
    """
    return NOVOGRAD.update(state, grads, params, dict(
        lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, grad_averaging=grad_averaging))
