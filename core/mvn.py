"""MVN-Grad: momentum on variance-normalized gradients.

Patitucci & Mokhtari, arXiv 2602.10204 (2026).  The equations follow a third-party
rendering of the paper's Algorithm 1 (the paper's own text was not reachable); see
docs/algorithms.md, "MVN-Grad".
"""

from __future__ import annotations

from ._rule import bias_corrections
from .rule import Hyperparameter as H
from .rule import define_rule


def _direction(xp, g, p, buffers, step):
    m, v, u = buffers
    m = step.b1 * m + (1 - step.b1) * g
    r = g - m
    v = step.b2 * v + (1 - step.b2) * (r * r) + step.eps_s
    z = g / (xp.sqrt(v * step.inv_bc2) + step.eps)
    u = step.b1 * u + (1 - step.b1) * z
    return u * step.inv_bc1, (m, v, u)


MVN = define_rule(
    "mvn", title="MVN-Grad", class_name="MVNGrad", state_name="MVNState",
    reference="Patitucci & Mokhtari, arXiv 2602.10204 (2026)",
    direction=_direction,
    constants=bias_corrections,
    buffers=("m", "v", "u"),
    hyperparameters={
        "lr": H(1e-3),
        "b1": H(0.9, "unit"),
        "b2": H(0.999, "unit"),
        "eps": H(1e-8, "eps"),
        "eps_s": H(1e-16),
        "weight_decay": H(0.0),
        "coupled_weight_decay": H(False, "flag"),
    },
    betas=("b1", "b2"),
    function_name="mvn_grad",
    settings=({}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "coupled_weight_decay": True}),
    memories=("b1", "b1", "b2"),  # m feeds v through g - m; v feeds z; u averages z
    order=0,
    doc="""One MVN-Grad step.  Returns ``(updates, new_state)``; ``params + updates`` is the step.

    With ``t`` the new count (1 on the first call)::

        m_t = b1 m + (1 - b1) g                      # raw mean, no bias correction
        v_t = b2 v + (1 - b2) (g - m_t)^2 + eps_s    # residual variance, eps_s stored in v
        z_t = g / (sqrt(v_t / (1 - b2^t)) + eps)     # normalize first ...
        u_t = b1 u + (1 - b1) z_t                    # ... then momentum
        update = -lr weight_decay theta - lr u_t / (1 - b1^t)

    ``coupled_weight_decay=True`` adds ``weight_decay * theta`` to ``g`` first (L2 form)
    instead of the decoupled term.  The first step is ``~ -lr sign(g) / b1``.

    Where the residual variance vanishes (``b1 = 0``, or constant gradients, with
    ``eps_s = 0``) ``z_t`` is ``g / eps``: the range check's floor ``eps >= 2**-64`` keeps
    it below 2**126 for every float32 gradient of the supported range (``|g| <= 2**62``).
    A NaN or an Inf in ``g`` makes that coordinate's update and state NaN from then on
    (nothing else); :func:`mvn_core.skip_if_nonfinite` skips such steps instead.
    """,
)
MVNState = MVN.state_type
mvn_init = MVN.init
mvn_update = MVN.update
