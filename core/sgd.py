"""Stochastic gradient descent with (Nesterov) momentum, as ``torch.optim.SGD``."""

from __future__ import annotations

from .rule import Hyperparameter as H
from .rule import define_rule


def _direction(xp, g, p, buffers, step):
    (b,) = buffers
    b = step.momentum * b + g
    return (g + step.momentum * b if step.nesterov else b), (b,)


def _check_relations(h):
    if h["nesterov"] and isinstance(h["momentum"], float) and h["momentum"] == 0.0:
        raise ValueError("nesterov=True needs momentum > 0")


SGD = define_rule(
    "sgd", title="SGD with momentum", class_name="SGD",
    reference="torch.optim.SGD semantics",
    direction=_direction,
    check=_check_relations,
    buffers=("b",),
    hyperparameters={
        "lr": H(1e-3),
        "momentum": H(0.0, "unit"),
        "nesterov": H(False, "flag"),
        "weight_decay": H(0.0),
        "coupled_weight_decay": H(False, "flag"),
    },
    settings=({"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
              {"momentum": 0.9, "weight_decay": 0.1, "coupled_weight_decay": True}),
    memories=("momentum",),
    order=70,
    doc="""One SGD step.  Returns ``(updates, new_state)``::

        b_t = momentum b + g                  # b_1 = g, as torch
        update = -lr weight_decay theta - lr b_t          (nesterov: -lr (g + momentum b_t))

    ``coupled_weight_decay=True`` adds ``weight_decay * theta`` to ``g`` first, which is
    what ``torch.optim.SGD(weight_decay=...)`` does.  A NaN in ``g`` makes that
    coordinate NaN from then on, an Inf makes it +-Inf (from then on with momentum; NaN
    after that step without); :func:`mvn_core.skip_if_nonfinite` skips such steps instead.
    """,
)
SGDState = SGD.state_type
sgd_init = SGD.init
sgd_update = SGD.update
