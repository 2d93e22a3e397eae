"""Running a rule of the core on a backend over a :class:`~.problems.Problem`."""

from __future__ import annotations

import mvn_core
from mvn_core import backends


def core_trajectory(rule_name, backend, problem, *, dtype="float64", device=None,
                    compiled=False, **hyper):
    """The parameters after each step (NumPy arrays), as :func:`oracle.trajectory` returns
    them; for ``"gan"``, each step's transformed gradients.

    ``compiled=True`` runs each step through the backend's compile hook (``jax.jit``).
    """
    lib = backends.get(backend)
    rule = mvn_core.rules[rule_name]

    def convert(arrays):
        return [lib.from_numpy(a, device=device, dtype=dtype) for a in arrays]

    if rule.kind == "transform":
        def step(params, state, grads):
            out, state = rule.update(state, grads, **hyper)
            return out, state
    else:
        def step(params, state, grads):
            updates, state = rule.update(state, grads, params, **hyper)
            return mvn_core.apply_updates(params, updates), state

    if compiled:
        step = lib.compile(step)
    params = convert(problem.params)
    state = rule.init(params)
    out = []
    for grads in problem.grads:
        result, state = step(params, state, convert(grads))
        if rule.kind != "transform":
            params = result
        out.append([lib.to_numpy(a) for a in result])
    return out
