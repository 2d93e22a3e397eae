"""Adam, and AdamW through decoupled weight decay (Kingma & Ba, arXiv 1412.6980;
Loshchilov & Hutter, arXiv 1711.05101)."""

from __future__ import annotations

from ._rule import bias_corrections
from .rule import Hyperparameter as H
from .rule import define_rule


def _constants(xp, step):
    corrections = bias_corrections(xp, step)
    return {"inv_bc1": corrections["inv_bc1"], "inv_sqrt_bc2": 1 / xp.sqrt(corrections["bc2"])}


def _direction(xp, g, p, buffers, step):
    m, v = buffers
    m = step.b1 * m + (1 - step.b1) * g
    v = step.b2 * v + (1 - step.b2) * (g * g)
    return (m * step.inv_bc1) / (xp.sqrt(v) * step.inv_sqrt_bc2 + step.eps), (m, v)


ADAM = define_rule(
    "adam", title="Adam / AdamW", class_name="Adam",
    reference="Kingma & Ba, arXiv 1412.6980 (2014)",
    direction=_direction,
    constants=_constants,
    buffers=("m", "v"),
    hyperparameters={
        "lr": H(1e-3),
        "b1": H(0.9, "unit"),
        "b2": H(0.999, "unit"),
        "eps": H(1e-8, "eps"),
        "weight_decay": H(0.0),
        "coupled_weight_decay": H(False, "flag"),
    },
    betas=("b1", "b2"),
    settings=({}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "coupled_weight_decay": True}),
    memories=("b1", "b2"),
    order=40,
    doc="""One Adam/AdamW step.  Returns ``(updates, new_state)``::

        m_t = b1 m + (1 - b1) g
        v_t = b2 v + (1 - b2) g^2
        update = -lr weight_decay theta - lr (m_t / (1 - b1^t)) / (sqrt(v_t) / sqrt(1 - b2^t) + eps)

    Weight decay is decoupled (AdamW); ``coupled_weight_decay=True`` gives
    ``torch.optim.Adam(weight_decay=...)`` semantics (``g += weight_decay * theta``).
    After a spike, ``v`` may underflow while ``m`` has not: the step is then ``m / eps``,
    finite for ``eps >= 2**-64`` (the range check's floor).

    A NaN or an Inf in ``g`` makes that coordinate's update and state NaN from then on
    (nothing else); :func:`mvn_core.skip_if_nonfinite` skips such steps instead.
    """,
)
AdamState = ADAM.state_type
adam_init = ADAM.init
adam_update = ADAM.update
