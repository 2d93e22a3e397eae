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
math (``--fmad=false`` for nvcc, ``-ffp-contract=off`` for g++).  Constants are written
as hexadecimal literals; Python numbers keep the Array API's weak-scalar rounding
(double-precision arithmetic among themselves, rounded to an array's dtype on meeting
it).  Hyperparameters are arguments, so a schedule does not recompile.
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
    """One value per element (or one per launch, for a scalar argument) of a kernel.

    ``weak`` marks a value of Python's float arithmetic (a literal, a hyperparameter
    given as a Python number, or arithmetic between them), kept in double precision: as
    in the Array API, where it meets an array value it is first rounded to that value's
    dtype.  Other values have their dtype."""

    graph: "Graph"
    dtype: np.dtype
    code: str  # a C expression or a variable name
    weak: bool = False

    def _op(self, op, other, reverse=False):
        other = self.graph.operand(other)
        a, b = _meet(*((other, self) if reverse else (self, other)))
        dtype = BOOL if op in COMPARISONS else _wider(a.dtype, b.dtype)
        return self.graph.emit(dtype, f"({a.code} {op} {b.code})", a.weak and b.weak)

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
    def __ge__(self, o): return self._op(">=", o)
    def __le__(self, o): return self._op("<=", o)
    def __eq__(self, o): return self._op("==", o)  # noqa: traced, elementwise
    def __ne__(self, o): return self._op("!=", o)  # noqa: traced, elementwise
    def __or__(self, o): return self._op("||", o)
    def __ror__(self, o): return self._op("||", o, reverse=True)
    def __and__(self, o): return self._op("&&", o)
    def __rand__(self, o): return self._op("&&", o, reverse=True)
    __hash__ = object.__hash__

    def __neg__(self):
        return self.graph.emit(self.dtype, f"(-{self.code})", self.weak)

    def __invert__(self):
        return self.graph.emit(BOOL, f"(!{self.code})")

    def __bool__(self):
        raise TypeError("a traced value has no truth value: a rule must not branch on "
                        "array values")


COMPARISONS = ("<", ">", "<=", ">=", "==", "!=", "||", "&&")


def _meet(a: Symbol, b: Symbol) -> tuple[Symbol, Symbol]:
    """A weak operand rounded to the other's dtype where the other is not weak."""
    if a.weak and not b.weak:
        return _cast(a, b.dtype), b
    if b.weak and not a.weak:
        return a, _cast(b, a.dtype)
    return a, b


def _cast(x: Symbol, dtype) -> Symbol:
    dtype = np.dtype(dtype)
    if x.dtype == dtype and not x.weak:
        return x
    return Symbol(x.graph, dtype, f"(({C_TYPES[dtype]}){x.code})")


def _wider(a: np.dtype, b: np.dtype) -> np.dtype:
    return a if a == b else np.result_type(a, b)


@dataclass
class Graph:
    """The statements of a kernel body, in order (one SSA variable per operation)."""

    lines: list[str] = field(default_factory=list)

    def emit(self, dtype, code, weak=False) -> Symbol:
        name = f"t{len(self.lines)}"
        self.lines.append(f"{C_TYPES[np.dtype(dtype)]} {name} = {code};")
        return Symbol(self, np.dtype(dtype), name, weak)

    def operand(self, value) -> Symbol:
        """A Symbol, or a Python number as a weak double-precision constant."""
        if isinstance(value, Symbol):
            return value
        if isinstance(value, bool):
            return Symbol(self, BOOL, "true" if value else "false")
        return Symbol(self, DOUBLE, literal(value, DOUBLE), weak=True)


DOUBLE = np.dtype(np.float64)


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
    a, b = _meet(graph.operand(a), graph.operand(b))
    cond = graph.operand(condition)
    return graph.emit(_wider(a.dtype, b.dtype), f"({cond.code} ? {a.code} : {b.code})",
                      a.weak and b.weak)


def _clip(x, min=None, max=None):
    # NaN passes through, as NumPy's clip lets it: both comparisons are false for it.
    if min is not None:
        _, lo = _meet(x, x.graph.operand(min))
        x = x.graph.emit(x.dtype, f"({x.code} < {lo.code} ? {lo.code} : {x.code})", x.weak)
    if max is not None:
        _, hi = _meet(x, x.graph.operand(max))
        x = x.graph.emit(x.dtype, f"({x.code} > {hi.code} ? {hi.code} : {x.code})", x.weak)
    return x


def _astype(x, dtype, copy=True):
    if not isinstance(x, Symbol) or (x.dtype == np.dtype(dtype) and not x.weak):
        return x
    return _cast(x, dtype)


def _constant_like(value):
    return lambda x: Symbol(x.graph, x.dtype, literal(value, x.dtype))


def _unsupported(name):
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"{name} is not elementwise: this rule cannot be fused")
    return refuse


namespace = SimpleNamespace(
    __name__="mvn_core.adapters._elementwise",
    sqrt=lambda x: x.graph.emit(x.dtype, f"sqrt({x.code})", x.weak),
    where=_where,
    clip=_clip,
    astype=_astype,
    isfinite=lambda x: x.graph.emit(BOOL, f"isfinite({x.code})"),
    zeros_like=_constant_like(0.0),
    ones_like=_constant_like(1.0),
    sum=_unsupported("sum"),
)


@dataclass(frozen=True)
class Kernel:
    """A traced step: the argument names and C types, and the body.

    ``inputs``: the gradient and the scalar arguments, read-only; ``outputs``: the
    parameter and the state buffers, read and written in place; ``scalars``: the names
    (in ``c``) of the scalar arguments, in order: its 0-d arrays and Python numbers.
    """

    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    scalars: tuple[str, ...]
    body: str


def trace(tensor_rule, c: SimpleNamespace, dtypes: dict, decays: bool) -> Kernel:
    """Trace ``tensor_rule.step_tensor`` for one combination of dtypes.

    ``c`` is the step's scalars (from ``TensorRule.scalars``): 0-d arrays become scalar
    arguments of their dtype, Python numbers weak double-precision arguments (so a new
    learning rate is a new argument, not a new kernel), flags static choices.
    ``dtypes`` gives the NumPy dtypes of ``"param"``, ``"grad"`` and ``"state"``.
    """
    graph = Graph()
    param, grad, state = (np.dtype(dtypes[k]) for k in ("param", "grad", "state"))
    symbols, scalars, types = {}, [], []
    for name, value in vars(c).items():
        if isinstance(value, bool):
            symbols[name] = value
        elif isinstance(value, (int, float)):
            symbols[name] = Symbol(graph, DOUBLE, f"s_{name}", weak=True)
            scalars.append(name)
            types.append("double")
        else:  # a 0-d array
            symbols[name] = Symbol(graph, np.dtype(value.dtype), f"s_{name}")
            scalars.append(name)
            types.append(C_TYPES[np.dtype(value.dtype)])
    names = tensor_rule.buffer_names
    old = tuple(Symbol(graph, state, f"b_{n}") for n in names)
    p = Symbol(graph, param, "p")
    update, new = tensor_rule.step_tensor(namespace, SimpleNamespace(**symbols),
                                          Symbol(graph, grad, "g"), p if decays else None,
                                          old, param)
    lines = list(graph.lines)
    lines += [f"b_{n} = {_cast(value, state).code};" for n, value in zip(names, new)]
    lines.append(f"p = p + {_cast(update, param).code};")
    inputs = (("g", C_TYPES[grad]),) + tuple((f"s_{n}", t) for n, t in zip(scalars, types))
    outputs = (("p", C_TYPES[param]),) + tuple((f"b_{n}", C_TYPES[state]) for n in names)
    return Kernel(inputs, outputs, tuple(scalars), "\n".join(lines))
