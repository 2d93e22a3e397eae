"""A rule's per-tensor mathematics traced into one elementwise C++ kernel body.

The rule's ``step_tensor`` (the pure mathematics, written against the Array API) runs
once on :class:`Symbol` arrays: each operation records a node instead of computing.
The graph is then printed as the body of an elementwise kernel that reads each
parameter, gradient and state element once and writes the new parameter and state
in place, e.g. a ``cupy.ElementwiseKernel`` (one fused pass over the memory, where the
pure rule makes one pass per operation).  Nothing of the mathematics is written here:
a change to the rule changes the kernel.

Per-coordinate rules only (a reduction such as NovoGrad's norm is not elementwise).
The body computes exactly what the operations compute one at a time, provided the
compiler neither contracts ``a * b + c`` into a fused multiply-add nor uses fast
math (``--fmad=false`` for nvcc, ``-ffp-contract=off`` for g++); constants are written
as hexadecimal literals, exact in their dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
           np.dtype(np.bool_): "bool"}
BOOL = np.dtype(np.bool_)


@dataclass(eq=False)
class Symbol:
    """One value per element (or one per launch, for a scalar input) of a traced kernel."""

    graph: "Graph"
    dtype: np.dtype
    code: str  # a C expression or a variable name
    ndim: int = 1  # arrays; scalar inputs have ndim 0 (only the count-derived ones)

    def _op(self, op, other, reverse=False):
        a, b = (self.graph.operand(other, self.dtype), self) if reverse else \
            (self, self.graph.operand(other, self.dtype))
        dtype = BOOL if op in ("<", ">", "==", "||") else _wider(a.dtype, b.dtype)
        return self.graph.emit(dtype, f"({a.code} {op} {b.code})", max(a.ndim, b.ndim))

    def __add__(self, o): return self._op("+", o)
    def __radd__(self, o): return self._op("+", o, reverse=True)
    def __sub__(self, o): return self._op("-", o)
    def __rsub__(self, o): return self._op("-", o, reverse=True)
    def __mul__(self, o): return self._op("*", o)
    def __rmul__(self, o): return self._op("*", o, reverse=True)
    def __truediv__(self, o): return self._op("/", o)
    def __rtruediv__(self, o): return self._op("/", o, reverse=True)
    def __gt__(self, o): return self._op(">", o)
    def __lt__(self, o): return self._op("<", o)
    def __eq__(self, o): return self._op("==", o)  # noqa: traced, elementwise
    def __or__(self, o): return self._op("||", o)
    def __ror__(self, o): return self._op("||", o, reverse=True)
    __hash__ = object.__hash__

    def __neg__(self):
        return self.graph.emit(self.dtype, f"(-{self.code})", self.ndim)

    def __invert__(self):
        return self.graph.emit(BOOL, f"(!{self.code})", self.ndim)


def _wider(a: np.dtype, b: np.dtype) -> np.dtype:
    return a if a == b else np.result_type(a, b)


@dataclass
class Graph:
    """The statements of a kernel body, in order (one SSA variable per operation)."""

    lines: list[str] = field(default_factory=list)

    def emit(self, dtype, code, ndim=1) -> Symbol:
        name = f"t{len(self.lines)}"
        self.lines.append(f"{C_TYPES[np.dtype(dtype)]} {name} = {code};")
        return Symbol(self, np.dtype(dtype), name, ndim)

    def operand(self, value, dtype) -> Symbol:
        """A Symbol, or a Python number as a constant of ``dtype`` (a weak scalar: it is
        rounded to the other operand's dtype, as the Array API and NumPy do)."""
        if isinstance(value, Symbol):
            return value
        if isinstance(value, bool):
            return Symbol(self, BOOL, "true" if value else "false", 0)
        return Symbol(self, dtype, literal(value, dtype), 0)


def literal(value: float, dtype) -> str:
    """``value`` rounded to ``dtype``, as an exact C++ literal."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore"):  # a too large value is infinite in the dtype
        rounded = float(dtype.type(value))
    suffix = "f" if dtype == np.float32 else ""
    if math.isnan(rounded):
        return f"(({C_TYPES[dtype]})NAN)"
    if math.isinf(rounded):
        return f"(({C_TYPES[dtype]}){'-' if rounded < 0 else ''}INFINITY)"
    return f"{rounded.hex()}{suffix}"


def _where(condition, a, b):
    graph = next(x.graph for x in (condition, a, b) if isinstance(x, Symbol))
    a_, b_ = (graph.operand(x, _dtype_of(a, b)) for x in (a, b))
    cond = graph.operand(condition, BOOL)
    return graph.emit(_wider(a_.dtype, b_.dtype), f"({cond.code} ? {a_.code} : {b_.code})")


def _dtype_of(*values):
    return next(v.dtype for v in values if isinstance(v, Symbol) and v.dtype != BOOL)


def _clip(x, min=None, max=None):
    # NaN passes through, as NumPy's clip lets it: both comparisons are false for it.
    if min is not None:
        lo = x.graph.operand(min, x.dtype)
        x = x.graph.emit(x.dtype, f"({x.code} < {lo.code} ? {lo.code} : {x.code})")
    if max is not None:
        hi = x.graph.operand(max, x.dtype)
        x = x.graph.emit(x.dtype, f"({x.code} > {hi.code} ? {hi.code} : {x.code})")
    return x


def _astype(x, dtype, copy=True):
    dtype = np.dtype(dtype)
    if not isinstance(x, Symbol) or x.dtype == dtype:
        return x
    return x.graph.emit(dtype, f"(({C_TYPES[dtype]}){x.code})", x.ndim)


def _constant_like(value):
    return lambda x: x.graph.operand(value, x.dtype)


def _unsupported(name):
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"{name} is not elementwise: this rule cannot be fused")
    return refuse


namespace = SimpleNamespace(
    __name__="mvn_core.adapters._elementwise",
    sqrt=lambda x: x.graph.emit(x.dtype, f"sqrt({x.code})", x.ndim),
    where=_where,
    clip=_clip,
    astype=_astype,
    isfinite=lambda x: x.graph.emit(BOOL, f"isfinite({x.code})", x.ndim),
    zeros_like=_constant_like(0.0),
    ones_like=_constant_like(1.0),
    sum=_unsupported("sum"),
)


@dataclass(frozen=True)
class Kernel:
    """A traced step: the argument names and C types, and the body.

    ``inputs``: the gradient (and the parameter when weight decay is on) and the
    scalars, read-only; ``outputs``: the parameter and the state buffers, read and
    written in place; ``scalars``: the names of the step's array scalars, in order.
    """

    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    scalars: tuple[str, ...]
    body: str


def trace(tensor_rule, c: SimpleNamespace, dtypes: dict, decays: bool) -> Kernel:
    """Trace ``tensor_rule.step_tensor`` for one combination of dtypes.

    ``c`` is the step's scalars (from ``TensorRule.scalars``): 0-d arrays become scalar
    arguments, Python numbers constants and flags static choices.  ``dtypes`` gives the
    NumPy dtypes of ``"param"``, ``"grad"`` and ``"state"``.
    """
    graph = Graph()
    param, grad, state = (np.dtype(dtypes[k]) for k in ("param", "grad", "state"))
    scalars = [k for k, v in vars(c).items() if hasattr(v, "dtype") and not isinstance(v, bool)]
    symbols = {k: v for k, v in vars(c).items() if k not in scalars}
    symbols.update({k: Symbol(graph, np.dtype(getattr(c, k).dtype), f"s_{k}", 0) for k in scalars})
    names = tensor_rule.buffer_names
    old = tuple(Symbol(graph, state, f"b_{n}") for n in names)
    p = Symbol(graph, param, "p")
    update, new = tensor_rule.step_tensor(namespace, SimpleNamespace(**symbols),
                                          Symbol(graph, grad, "g"), p if decays else None,
                                          old, param)
    lines = list(graph.lines)
    lines += [f"b_{n} = {value.code};" for n, value in zip(names, new)]
    lines.append(f"p = p + {update.code};")
    ctype = C_TYPES.__getitem__
    inputs = (("g", ctype(grad)),) + tuple(
        (f"s_{k}", ctype(np.dtype(getattr(c, k).dtype))) for k in scalars)
    outputs = (("p", ctype(param)),) + tuple((f"b_{n}", ctype(state)) for n in names)
    return Kernel(inputs, outputs, tuple(scalars), "\n".join(lines))
