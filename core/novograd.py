"""NovoGrad: a second moment per tensor, momentum on the normalized gradient
(Ginsburg et al., arXiv 1905.11286)."""

from __future__ import annotations

from .rule import Hyperparameter as H
from .rule import define_rule


def _constants(xp, step):
    return {"first": step.t == 1}


def _squared_norm(xp, g):
    return xp.sum(g * g)


def _direction(xp, g, p, buffers, step, norm2):
    m, v = buffers
    v = xp.where(step.first, norm2, step.b2 * v + (1 - step.b2) * norm2)
    x = g / (xp.sqrt(v) + step.eps)
    if p is not None:
        x = x + step.weight_decay * p
    if step.grad_averaging:
        x = (1 - step.b1) * x
    m = step.b1 * m + x
    return m, (m, v)


NOVOGRAD = define_rule(
    "novograd", title="NovoGrad", class_name="NovoGrad",
    reference="Ginsburg et al., arXiv 1905.11286 (2019)",
    direction=_direction,
    constants=_constants,
    statistic=_squared_norm, tensor_buffers=("v",), decay="inside",
    buffers=("m", "v"),
    hyperparameters={
        "lr": H(1e-3),
        "b1": H(0.95, "unit"),
        "b2": H(0.98, "unit"),
        "eps": H(1e-8, "eps"),
        "weight_decay": H(0.0),
        "grad_averaging": H(False, "flag"),
    },
    betas=("b1", "b2"),
    settings=({}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "grad_averaging": True}),
    memories=("b1", "b2"),
    order=30,
    doc="""One NovoGrad step.  Returns ``(updates, new_state)``.  Per tensor::

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
    """,
)
NovoGradState = NOVOGRAD.state_type
novograd_init = NOVOGRAD.init
novograd_update = NOVOGRAD.update
