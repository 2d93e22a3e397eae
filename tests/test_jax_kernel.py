"""The generated kernel in its mode that writes the updates rather than the parameters
(what an optax transformation returns), checked on NumPy.
"""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest

import mvn_core
from mvn_core.adapters import _cpu_kernel, _elementwise, _native
from mvn_core.conformance.cases import cases

KERNEL_RULES = [n for n, r in mvn_core.rules.items() if r.tensor_rule is not None]
CASES = list(cases(KERNEL_RULES))
HAS_COMPILER = _cpu_kernel.unavailable_reason() is None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
SHAPES = [(), (0,), (7,), (5, 4), (_cpu_kernel.CHUNK + 3,), (0, 3), (2, 3, 2, 3)]
OPTAX_NAMES = {"mvn": "mvn_grad"}


# ---- the kernel that writes the updates, on NumPy -------------------------------------

def _numpy_problem(dtype, steps=3, seed=1, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    grads = [[np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1, s), dtype=dtype)
              for s in shapes] for _ in range(steps)]
    return params, grads


def _update_kernel_step(rule, state, params, grads, hyper):
    """One step of the kernel that writes the updates: the updates and the new state
    (its buffers written in place); the params are only read."""
    tensor_rule = rule.tensor_rule
    decays = tensor_rule.decays(hyper)
    count = npx.asarray(state.count + 1)
    dtype = tensor_rule.compute_dtype(npx, grads[0].dtype, state[1][0].dtype, params[0].dtype)
    c = tensor_rule.scalars(npx, count, dtype, hyper)
    element, per_tensor = _cpu_kernel.split_buffers(tensor_rule, list(state[1:]))
    names = [params[0].dtype, grads[0].dtype, (element or per_tensor)[0][0].dtype]
    names += [per_tensor[0][0].dtype] if per_tensor else []
    kernel = _cpu_kernel.source(tensor_rule, _elementwise.describe(c),
                                tuple(str(n) for n in names), decays, in_place=False)
    assert "update" in kernel.roles and "P_p[i] =" not in kernel.source
    fn = _native.function(kernel.source, kernel.name)
    updates = [np.empty_like(p) for p in params]
    arrays = {"p": params, "g": grads, "update": updates}
    arrays.update({f"b_{n}": column for n, column in
                   zip([n for n in tensor_rule.buffer_names if n not in tensor_rule.scalar_buffers]
                       + [n for n in tensor_rule.buffer_names if n in tensor_rule.scalar_buffers],
                       element + per_tensor)})
    table = np.array([a.ctypes.data for role in kernel.roles for a in arrays[role]], np.uint64)
    scalars = np.array([float(getattr(c, name)) for name in kernel.scalars] or [0.0])
    stats = None
    if kernel.has_statistic:
        stats = np.array([float(s) for s in tensor_rule.statistics(
            npx, [(g, dtype) for g in grads])], np.float64)
    numel = np.array([p.size for p in params], np.int64)
    fn(len(params), numel.ctypes.data, table.ctypes.data, scalars.ctypes.data,
       None if stats is None else stats.ctypes.data, _cpu_kernel.CHUNK, 2)
    return updates, state._replace(count=count)


@needs_compiler
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_kernel_writing_the_updates_is_the_pure_rule_on_numpy(case):
    """Updates, bit for bit those of the pure rule on NumPy (IEEE arithmetic), over
    several chunks and empty and 0-d tensors; the parameters are left as they were."""
    rule = mvn_core.rules[case.rule]
    hyper = rule.tensor_rule.checked_hyperparameters({**rule.defaults, **case.hyper})
    params, grad_steps = _numpy_problem("float32")
    state, pure_state = rule.init(params), rule.init(params)
    for grads in grad_steps:
        before = [p.copy() for p in params]
        updates, state = _update_kernel_step(rule, state, params, grads, hyper)
        expected, pure_state = rule.update(pure_state, grads, params, **hyper)
        for u, e in zip(updates, expected):
            np.testing.assert_array_equal(u, e)
        for p, b in zip(params, before):
            np.testing.assert_array_equal(p, b)
        for column, pure_column in zip(state[1:], pure_state[1:]):
            for b, e in zip(column, pure_column):
                np.testing.assert_array_equal(b, e)
        params = mvn_core.apply_updates(params, updates)
