"""The fused CuPy path of the array optimizers: one elementwise kernel per tensor and
step, traced from the rule's pure mathematics (:mod:`._elementwise`), reading the
parameter, gradient and state once and writing the parameter and state in place.

The kernel is compiled by CuPy (NVRTC) once per rule, dtypes and static options,
without fused multiply-adds, so that each operation rounds as it does alone: the
results are those of the pure rule run on CuPy, bit for bit.
"""

from __future__ import annotations

import functools

from mvn_core._rule import next_count

from . import _c_source, _elementwise


def step(rule, state, params, grads, hyper):
    """One fused step of ``rule`` (per-coordinate) on CuPy arrays, in place.

    ``params``, ``grads`` and ``state`` must already be checked (shapes, dtypes,
    device).  Returns the new state: the count advanced, the same buffers."""
    import array_api_compat.cupy as xp

    tensor_rule = rule.tensor_rule
    _check_dtypes(params, grads, state[1:])
    hyper = tensor_rule.checked_hyperparameters(hyper)
    decays = tensor_rule.decays(hyper)
    new_count = next_count(xp, state.count)
    columns = state[1:]
    scalars = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.size == 0:
            continue
        buffers = [column[i] for column in columns]
        dtype = xp.result_type(g.dtype, buffers[0].dtype, p.dtype, xp.float32)
        if dtype not in scalars:
            scalars[dtype] = tensor_rule.scalars(xp, new_count, dtype, hyper)
        c = scalars[dtype]
        dtypes = (str(p.dtype), str(g.dtype), str(buffers[0].dtype))
        kernel, names = _compiled(tensor_rule, dtypes, decays, _elementwise.describe(c))
        kernel(g, *(getattr(c, name) for name in names), p, *buffers)
    return type(state)(new_count, *columns)


def _check_dtypes(params, grads, columns):
    """Refuse, before any kernel runs, the dtypes the traced kernels do not take."""
    arrays = [*params, *grads, *(b for column in columns for b in column)]
    for a in arrays:
        if str(a.dtype) not in ("float32", "float64"):
            raise TypeError(f"fused=True takes float32 and float64 arrays, got {a.dtype}; "
                            "use fused=False for other dtypes")


@functools.lru_cache(maxsize=None)
def _compiled(tensor_rule, dtypes, decays, description):
    """The CuPy kernel for one rule, dtypes, weight decay on/off and scalars."""
    import cupy

    param, grad, state = dtypes
    trace = _elementwise.trace(tensor_rule, description,
                               {"param": param, "grad": grad, "state": state}, decays=decays)
    types = {i.name: i.dtype for i in trace.inputs}
    inputs = ["g"] + [f"s_{name}" for name in trace.scalars]
    outputs = ["p"] + [f"b_{n}" for n in trace.buffer_names]
    compiled = cupy.ElementwiseKernel(
        ", ".join(f"{types[n]} {n}" for n in inputs),
        ", ".join(f"{types[n]} {n}" for n in outputs),
        _c_source.elementwise_body(trace), name=f"mvn_core_{tensor_rule.name}_step",
        options=("--fmad=false",))
    return compiled, trace.scalars
