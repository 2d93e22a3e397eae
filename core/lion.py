"""Lion: the sign of an interpolation of momentum and gradient (Chen et al.,
arXiv 2302.06675)."""

from __future__ import annotations

from .rule import Hyperparameter as H
from .rule import define_rule


def _direction(xp, g, p, buffers, step):
    (m,) = buffers
    d = xp.sign(step.b1 * m + (1 - step.b1) * g)
    m = step.b2 * m + (1 - step.b2) * g
    return d, (m,)


LION = define_rule(
    "lion", title="Lion", class_name="Lion",
    reference="Chen et al., arXiv 2302.06675 (2023)",
    direction=_direction,
    buffers=("m",),
    hyperparameters={
        "lr": H(1e-4),
        "b1": H(0.9, "unit"),
        "b2": H(0.99, "unit"),
        "weight_decay": H(0.0),
    },
    betas=("b1", "b2"),
    settings=({}, {"b1": 0.95, "b2": 0.98, "weight_decay": 0.1}),
    memories=("b2",),
    order=65,
    doc="""One Lion step.  Returns ``(updates, new_state)``::

        c = b1 m + (1 - b1) g
        update = -lr sign(c) - lr weight_decay theta
        m_t = b2 m + (1 - b2) g

    ``sign(0) = 0``: a coordinate whose ``step`` is exactly zero does not move (but for
    weight decay).  Every coordinate moves by ``lr`` at most, whatever the scale of the
    gradients.  A NaN in ``g`` makes that coordinate's update and state NaN from then on
    (nothing else); an Inf makes its ``m`` infinite, so that it then moves by ``lr``
    in the same direction at every step (its update stays finite);
    :func:`mvn_core.skip_if_nonfinite` skips such steps instead.
    """,
)
LionState = LION.state_type
lion_init = LION.init
lion_update = LION.update
