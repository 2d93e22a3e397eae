"""The fused CuPy path of the array optimizers: one elementwise kernel per tensor and
step, traced from the rule's pure mathematics (:mod:`._elementwise`), reading the
parameter, gradient and state once and writing the parameter and state in place.

The kernel is compiled by CuPy (NVRTC) once per rule, dtypes and static options,
without fused multiply-adds, so that each operation rounds as it does alone: the
results are those of the pure rule run on CuPy, bit for bit.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from mvn_core._rule import next_count

from . import _elementwise

CUPY_TYPES = {"float": "float32", "double": "float64", "bool": "bool"}


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
        dtypes = (np.dtype(p.dtype), np.dtype(g.dtype), np.dtype(buffers[0].dtype))
        kernel, names = _compiled(tensor_rule, dtypes, decays, _describe(c))
        kernel(g, *(getattr(c, name) for name in names), p, *buffers)
    return type(state)(new_count, *columns)


def _check_dtypes(params, grads, columns):
    """Refuse, before any kernel runs, the dtypes the traced kernels do not take."""
    arrays = [*params, *grads, *(b for column in columns for b in column)]
    for a in arrays:
        if np.dtype(a.dtype) not in _elementwise.C_TYPES or a.dtype == np.bool_:
            raise TypeError(f"fused=True takes float32 and float64 arrays, got {a.dtype}; "
                            "use fused=False for other dtypes")


def _describe(c) -> tuple:
    """What a traced kernel depends on in the step's scalars, hashable: flags by value
    (static choices), numbers and arrays by kind and dtype (they are arguments)."""
    out = []
    for name, value in vars(c).items():
        if isinstance(value, bool):
            out.append((name, "flag", value))
        elif isinstance(value, (int, float)):
            out.append((name, "number", None))
        else:
            out.append((name, "array", str(value.dtype)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _compiled(tensor_rule, dtypes, decays, description):
    """The CuPy kernel for one rule, dtypes, weight decay on/off and scalars."""
    import cupy

    stand_ins = {name: {"flag": value, "number": 0.0}.get(kind) if kind != "array"
                 else np.zeros((), dtype=value) for name, kind, value in description}
    param, grad, state = dtypes
    kernel = _elementwise.trace(tensor_rule, SimpleNamespace(**stand_ins),
                                {"param": param, "grad": grad, "state": state}, decays)
    inputs = ", ".join(f"{CUPY_TYPES[t]} {n}" for n, t in kernel.inputs)
    outputs = ", ".join(f"{CUPY_TYPES[t]} {n}" for n, t in kernel.outputs)
    compiled = cupy.ElementwiseKernel(inputs, outputs, kernel.body,
                                      name=f"mvn_core_{tensor_rule.name}_step",
                                      options=("--fmad=false",))
    return compiled, kernel.scalars
