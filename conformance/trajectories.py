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


def ieee_trajectory(rule_name, backend, problem, *, dtype="float64", device=None,
                    compiled=False, state_dtype=None, **hyper):
    """The rule's per-tensor mathematics (``TensorRule.step_tensor``) evaluated in IEEE
    arithmetic, each operation correctly rounded (on NumPy), from the step's scalars and
    the statistics that the backend's library computes: what the generated kernels
    compute, bit for bit, on that backend.  Parameters after each step, as NumPy arrays.

    It differs from the pure rule run on the backend itself only where the library's
    own elementwise operations are not correctly rounded (PyTorch's CPU square root,
    for one, is not; nor is XLA's division by a 0-d array, a multiplication by its
    reciprocal).  ``compiled=True`` computes the scalars and statistics through the
    backend's compile hook, as a compiled step does (``jax.jit`` computes ``1 / sqrt``
    as an approximate ``rsqrt``).  ``state_dtype`` goes to the rule's ``init``.
    bfloat16 is held in NumPy through ``ml_dtypes``.
    """
    import array_api_compat
    import array_api_compat.numpy as npx

    lib = backends.get(backend)
    rule = mvn_core.rules[rule_name]
    tensor_rule = rule.tensor_rule
    hyper = tensor_rule.checked_hyperparameters({**rule.defaults, **hyper})
    decays = tensor_rule.decays(hyper)
    params = [lib.from_numpy(a, device=device, dtype=dtype) for a in problem.params]
    xp = array_api_compat.array_namespace(*params)
    state = rule.init(params, state_dtype=state_dtype)
    # gradients come in the parameters' dtype here
    dtypes = [tensor_rule.compute_dtype(xp, p.dtype, state[1][i].dtype, p.dtype)
              for i, p in enumerate(params)]

    def step_inputs(count, grads):
        """Per tensor, the step's scalars that are arrays; the statistics."""
        statistics = tensor_rule.statistics(xp, list(zip(grads, dtypes)))
        scalars = [tensor_rule.scalars(xp, count, d, hyper) for d in dtypes]
        return [{k: v for k, v in vars(s).items() if _is_array(v)} for s in scalars], statistics

    computed = lib.compile(step_inputs) if compiled else step_inputs
    count = state.count
    host = [_host(lib, p) for p in params]
    columns = [[_host(lib, b) for b in column] for column in state[1:]]
    out = []
    for grads in problem.grads:
        grads = [lib.from_numpy(a, device=device, dtype=dtype) for a in grads]
        count = count + 1
        arrays, statistics = computed(count, grads)
        for i, g in enumerate(grads):
            on_device = tensor_rule.scalars(xp, count, dtypes[i], hyper)
            step_scalars = type(on_device)(**{k: _host(lib, arrays[i][k]) if k in arrays[i] else v
                                              for k, v in vars(on_device).items()})
            stat = None if statistics[i] is None else _host(lib, statistics[i])
            old = tuple(column[i] for column in columns)
            p = host[i]
            update, new = tensor_rule.step_tensor(npx, step_scalars, _host(lib, g),
                                                  p if decays else None, old, p.dtype, stat)
            host[i] = npx.asarray(p + npx.astype(update, p.dtype))
            for column, value in zip(columns, new):
                column[i] = npx.asarray(value)
        out.append([np_float(p) for p in host])
    return out


def _is_array(value) -> bool:
    import array_api_compat

    return array_api_compat.is_array_api_obj(value)


def _host(lib, x):
    """``x`` as a NumPy array of its own dtype (bfloat16 through ``ml_dtypes``)."""
    import numpy as np

    value = np.asarray(lib.to_numpy(x))
    if "bfloat16" in str(x.dtype):
        import ml_dtypes

        value = value.astype(ml_dtypes.bfloat16)
    return value


def np_float(x):
    """A NumPy copy of ``x``, bfloat16 widened to float32 (exactly)."""
    import numpy as np

    return np.array(x, dtype=np.float32 if x.dtype.name == "bfloat16" else x.dtype)
