"""A rule defined outside mvn-core, with the same machinery as the built-in ones.

RMSprop (Hinton's lecture notes; ``torch.optim.RMSprop`` without momentum or centring)
is declared once with :func:`mvn_core.define_rule`; from that declaration come its pure
functions, a ``torch.optim`` optimizer, an optax transformation and, on a CPU, the
generated multi-tensor kernel.  ``ORACLE`` gives the float64 reference that the
conformance check compares it with, written separately from the rule (plain NumPy)::

    python -m examples.custom_rule                                 # train with it
    mvn-core check --rules-from examples.custom_rule               # check every path

(both from the repository's root, where ``examples`` is importable).
"""

from __future__ import annotations

import numpy as np

import mvn_core
from mvn_core import Hyperparameter as H
from mvn_core.conformance.oracle import Entry, Scaling


def _direction(xp, g, p, buffers, step):
    """One tensor: ``d`` such that the update is ``-lr * d``, and the new buffers."""
    (v,) = buffers
    v = step.alpha * v + (1 - step.alpha) * (g * g)
    return g / (xp.sqrt(v) + step.eps), (v,)


RMSPROP = mvn_core.define_rule(
    "rmsprop", title="RMSprop", class_name="RMSprop",
    reference="Tieleman and Hinton, Lecture 6.5 of Neural Networks for Machine Learning (2012)",
    direction=_direction,
    buffers=("v",),
    hyperparameters={
        "lr": H(1e-2),
        "alpha": H(0.99, "unit"),
        "eps": H(1e-8, "eps"),
        "weight_decay": H(0.0),
    },
    settings=({}, {"alpha": 0.9, "weight_decay": 0.1}),
    memories=("alpha",),
    doc="""One RMSprop step.  Returns ``(updates, new_state)``::

        v_t = alpha v + (1 - alpha) g^2
        update = -lr g / (sqrt(v_t) + eps) - lr weight_decay theta
    """,
)


def _reference_step(t, theta, g, s, h):
    """The float64 reference of one step (``s``: the buffers, updated in place)."""
    s["v"] = h["alpha"] * s["v"] + (1 - h["alpha"]) * g ** 2
    return theta - h["lr"] * h["weight_decay"] * theta - h["lr"] * g / (np.sqrt(s["v"]) + h["eps"])


ORACLE = {
    "rmsprop": Entry(
        defaults=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0),
        buffers=("v",),
        step=_reference_step,
        first_direction=lambda g, h: g / (np.abs(g) * np.sqrt(1 - h["alpha"]) + h["eps"]),
        scaling=Scaling(eps={"eps": 1}),
    ),
}


def train_with_torch(steps: int = 100) -> list[float]:
    """A least-squares fit with the rule as a ``torch.optim`` optimizer."""
    import torch

    from mvn_core.adapters.torch import optimizer_class

    torch.manual_seed(0)
    x, w_true = torch.randn(256, 8), torch.randn(8, 1)
    y = x @ w_true
    w = torch.zeros(8, 1, requires_grad=True)
    optimizer = optimizer_class(RMSPROP)([w], lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_with_optax(steps: int = 100) -> list[float]:
    """The same fit with the rule as an optax transformation, each step under jax.jit."""
    import jax
    import jax.numpy as jnp
    import optax

    from mvn_core.adapters.optax import transformation

    x = jax.random.normal(jax.random.key(0), (256, 8))
    y = x @ jax.random.normal(jax.random.key(1), (8, 1))
    tx = transformation(RMSPROP)(learning_rate=1e-2)

    def loss_of(w):
        return jnp.mean((x @ w - y) ** 2)

    @jax.jit
    def step(w, state):
        loss, grad = jax.value_and_grad(loss_of)(w)
        updates, state = tx.update(grad, state, w)
        return optax.apply_updates(w, updates), state, loss

    w = jnp.zeros((8, 1))
    state, losses = tx.init(w), []
    for _ in range(steps):
        w, state, loss = step(w, state)
        losses.append(float(loss))
    return losses


if __name__ == "__main__":
    for name, train in (("torch", train_with_torch), ("optax", train_with_optax)):
        losses = train()
        print(f"RMSprop with {name}: loss {losses[0]:.4f} -> {losses[-1]:.6f} "
              f"in {len(losses)} steps")
