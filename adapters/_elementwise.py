"""A rule's per-tensor mathematics traced into a graph of elementwise operations: the
one kernel generator of the project.

The rule's ``step_tensor`` (its pure mathematics, written against the Array API) runs
once on :class:`Value` stand-ins: each operation records a :class:`Node` instead of
computing.  The printers turn the graph into kernels: C for the CPU
(:mod:`._c_source`), CUDA C for CuPy (:mod:`._cuda_source`) and Triton for torch on
CUDA (:mod:`._triton_kernel`).  Nothing of the mathematics is written in this
module or in a printer: a change to the rule changes every kernel.

Rounding is the pure rule's, operation by operation, provided the compiler neither
contracts ``a * b + c`` into a fused multiply-add nor uses fast math.  Python numbers
keep the Array API's weak-scalar semantics: arithmetic among them is double precision,
and a weak value is rounded to an array value's dtype where the two meet.  Float16 and
bfloat16 values are held in float32 variables that carry values of their own dtype
(every cast to them rounds explicitly), since they are storage formats here: a rule
computes in float32 at least.

Values are *element*-wise (one per element: the gradient, the parameter, the state
buffers) or *uniform* (one per tensor or per launch: the step's scalars, a per-tensor
statistic, a buffer of one value per tensor).  An operation on uniform values only is
uniform; printers compute those once per tensor (or chunk), outside the element loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from mvn_core.backends import numpy as numpy_backend

from ._common import Subset

# dtype name -> rank among floating dtypes (for promotion): 0 bool, 1 half formats.
FLOATING = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}
BOOL = "bool"
DOUBLE = "float64"
ARITHMETIC = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
COMPARISONS = {"lt": "<", "gt": ">", "le": "<=", "ge": ">=", "eq": "==", "ne": "!="}
LOGICAL = {"and": "&&", "or": "||"}


def dtype_name(dtype: Any) -> str:
    """The name of a dtype of any library (``torch.float32`` -> ``"float32"``)."""
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in FLOATING and name != BOOL:
        raise TypeError(f"dtype {dtype} has no kernel type: kernels take float16, bfloat16, "
                        "float32, float64 and bool")
    return name


def promote(a: str, b: str) -> str:
    """The dtype of a binary operation between two non-weak values."""
    if a == b:
        return a
    if BOOL in (a, b):
        raise TypeError(f"arithmetic between {a} and {b}: a rule mixes booleans and numbers")
    wide = max(FLOATING[a], FLOATING[b])
    return "float32" if wide == 1 else next(n for n, r in FLOATING.items() if r == wide)


@dataclass(eq=False)
class Value:
    """One value per element (or, ``uniform``, one per tensor or launch) of a kernel.

    ``weak`` marks a value of Python's float arithmetic (a literal, a hyperparameter
    given as a Python number, or arithmetic among them), kept in double precision and
    rounded to an array value's dtype where the two meet."""

    graph: "Graph"
    dtype: str
    name: str
    weak: bool = False
    uniform: bool = False

    def _op(self, op, other, reverse=False):
        other = self.graph.operand(other)
        a, b = meet(*((other, self) if reverse else (self, other)))
        if op in COMPARISONS or op in LOGICAL:
            dtype = BOOL
        else:
            dtype = promote(a.dtype, b.dtype)
        return self.graph.emit(op, dtype, (a, b), a.weak and b.weak)

    def __add__(self, o): return self._op("add", o)
    def __radd__(self, o): return self._op("add", o, reverse=True)
    def __sub__(self, o): return self._op("sub", o)
    def __rsub__(self, o): return self._op("sub", o, reverse=True)
    def __mul__(self, o): return self._op("mul", o)
    def __rmul__(self, o): return self._op("mul", o, reverse=True)
    def __truediv__(self, o): return self._op("div", o)
    def __rtruediv__(self, o): return self._op("div", o, reverse=True)
    def __gt__(self, o): return self._op("gt", o)
    def __lt__(self, o): return self._op("lt", o)
    def __ge__(self, o): return self._op("ge", o)
    def __le__(self, o): return self._op("le", o)
    def __eq__(self, o): return self._op("eq", o)  # noqa: traced, elementwise
    def __ne__(self, o): return self._op("ne", o)  # noqa: traced, elementwise
    def __or__(self, o): return self._op("or", o)
    def __ror__(self, o): return self._op("or", o, reverse=True)
    def __and__(self, o): return self._op("and", o)
    def __rand__(self, o): return self._op("and", o, reverse=True)
    __hash__ = object.__hash__

    def __neg__(self):
        return self.graph.emit("neg", self.dtype, (self,), self.weak)

    def __invert__(self):
        return self.graph.emit("not", BOOL, (self,))

    def __bool__(self):
        raise TypeError("a traced value has no truth value: a rule must not branch on "
                        "array values")


@dataclass(frozen=True)
class Constant:
    """A literal: ``value`` exactly representable in ``dtype``."""

    value: float | bool
    dtype: str
    weak: bool = False
    uniform: bool = True


@dataclass(frozen=True)
class Node:
    """``name = op(*args)`` in ``dtype``; args are Values or Constants."""

    name: str
    op: str
    dtype: str
    args: tuple
    uniform: bool


@dataclass
class Graph:
    """The operations of a kernel, in order (one variable per operation)."""

    nodes: list[Node] = field(default_factory=list)

    def emit(self, op: str, dtype: str, args: tuple, weak: bool = False) -> Value:
        name = f"t{len(self.nodes)}"
        uniform = all(a.uniform for a in args)
        self.nodes.append(Node(name, op, dtype, args, uniform))
        return Value(self, dtype, name, weak, uniform)

    def operand(self, value: Any) -> Value | Constant:
        """A Value, or a Python number as a weak double-precision constant."""
        if isinstance(value, (Value, Constant)):
            return value
        if isinstance(value, bool):
            return Constant(value, BOOL)
        return Constant(float(value), DOUBLE, weak=True)


def meet(a, b):
    """A weak operand rounded to the other's dtype where the other is not weak."""
    if a.weak and not b.weak:
        return cast(a, b.dtype), b
    if b.weak and not a.weak:
        return a, cast(b, a.dtype)
    return a, b


def cast(x, dtype: str):
    """``x`` in ``dtype`` (a constant is rounded here, exactly as the cast would)."""
    if x.dtype == dtype and not x.weak:
        return x
    if isinstance(x, Constant):
        return Constant(round_to(x.value, dtype), dtype)
    return x.graph.emit("cast", dtype, (x,))


def round_to(value: float | bool, dtype: str) -> float | bool:
    """``value`` rounded to ``dtype`` (to nearest, ties to even), as a Python number;
    to bfloat16 through float32, as PyTorch rounds."""
    if dtype == BOOL:
        return bool(value)
    with np.errstate(over="ignore"):  # a too large value is infinite in the dtype
        if dtype == "bfloat16":
            value = np.float32(value)
        return float(numpy_backend.round_to(value, dtype))


def _where(condition, a, b):
    graph = next(x.graph for x in (condition, a, b) if isinstance(x, Value))
    a, b = meet(graph.operand(a), graph.operand(b))
    cond = graph.operand(condition)
    return graph.emit("where", promote(a.dtype, b.dtype), (cond, a, b), a.weak and b.weak)


def _clip(x, min=None, max=None):
    # NaN passes through, as NumPy's clip and torch's clamp let it: both comparisons
    # are false for it.
    if min is not None:
        _, lo = meet(x, x.graph.operand(min))
        x = x.graph.emit("where", x.dtype, (x < lo, lo, x), x.weak)
    if max is not None:
        _, hi = meet(x, x.graph.operand(max))
        x = x.graph.emit("where", x.dtype, (x > hi, hi, x), x.weak)
    return x


def _astype(x, dtype, copy=True):
    if not isinstance(x, Value):
        return x
    return cast(x, dtype_name(dtype))


def _constant_like(value):
    return lambda x: Constant(round_to(value, x.dtype), x.dtype)


def _unsupported(name):
    def refuse(*args, **kwargs):
        raise NotImplementedError(f"{name} is not elementwise: a rule that needs it declares "
                                  "it as its statistic, computed before the kernel")
    return refuse


# The Array-API subset a rule's per-tensor mathematics may use in a kernel: the operators
# of :class:`Value` and the functions below (``sum`` refuses, saying why).
namespace = Subset(
    __name__="mvn_core.adapters._elementwise",
    sqrt=lambda x: x.graph.emit("sqrt", x.dtype, (x,), x.weak),
    sign=lambda x: x.graph.emit("sign", x.dtype, (x,), x.weak),
    where=_where,
    clip=_clip,
    astype=_astype,
    isfinite=lambda x: x.graph.emit("isfinite", BOOL, (x,)),
    zeros_like=_constant_like(0.0),
    ones_like=_constant_like(1.0),
    sum=_unsupported("sum"),
)


@dataclass(frozen=True)
class Input:
    """A value a kernel reads: ``kind`` is ``"element"`` (an array of the tensor's
    shape), ``"tensor"`` (one value per tensor) or ``"scalar"`` (one per launch)."""

    name: str
    dtype: str
    kind: str
    weak: bool = False


@dataclass(frozen=True)
class Trace:
    """A traced step of one rule for one combination of dtypes and static options.

    ``inputs``: what the kernel reads (the gradient ``g``, the parameter ``p`` when
    weight decay is on, the step's scalars ``s_<name>`` in the order of
    :attr:`scalars`, the statistic ``stat`` of a rule that has one, and the old state
    buffers ``b_<name>``).  ``nodes``: the operations.  ``outputs``: what it writes,
    ``(name, value, dtype)``: each new buffer ``b_<name>`` and the ``update`` in the
    parameter's dtype.  ``tensor_buffers`` names the buffers of one value per tensor.
    """

    inputs: tuple[Input, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[tuple[str, Any, str], ...]
    scalars: tuple[str, ...]
    buffer_names: tuple[str, ...]
    tensor_buffers: frozenset
    dtypes: dict

    @property
    def has_statistic(self) -> bool:
        return any(i.name == "stat" for i in self.inputs)


def describe(step_scalars: SimpleNamespace) -> tuple:
    """What a trace depends on in the step's scalars, hashable: flags by value
    (static choices), numbers and arrays by kind and dtype (they are arguments)."""
    out = []
    for name, value in vars(step_scalars).items():
        if isinstance(value, bool):
            out.append((name, "flag", value))
        elif isinstance(value, (int, float)):
            out.append((name, "number", None))
        else:
            out.append((name, "array", dtype_name(value.dtype)))
    return tuple(out)


def trace(tensor_rule, description: tuple, dtypes: dict, *, decays: bool,
          in_place: bool = True, negate_grad: bool = False) -> Trace:
    """Trace ``tensor_rule.step_tensor`` for one combination of dtypes and options.

    ``description`` is :func:`describe` of the step's scalars: 0-d arrays become scalar
    arguments of their dtype, Python numbers weak double-precision arguments (so a new
    learning rate is a new argument, not a new kernel), flags static choices.
    ``dtypes`` gives the dtype names of ``"param"``, ``"grad"`` and ``"state"`` (and
    ``"tensor_state"``, of the buffers of one value per tensor, when the rule has any).
    ``decays``: weight decay is on (the rule reads the parameter).  ``in_place``: the
    kernel writes the new parameter ``p + update`` (output ``p``); otherwise it writes
    the update (output ``update``).  ``negate_grad``: the rule gets ``-g`` (maximize).
    """
    graph = Graph()
    param, grad, state = (dtype_name(dtypes[k]) for k in ("param", "grad", "state"))
    symbols, scalars, inputs = {}, [], []
    for name, kind, value in description:
        if kind == "flag":
            symbols[name] = value
            continue
        weak = kind == "number"
        inputs.append(Input(f"s_{name}", DOUBLE if weak else value, "scalar", weak))
        symbols[name] = Value(graph, inputs[-1].dtype, f"s_{name}", weak, uniform=True)
        scalars.append(name)
    step_scalars = SimpleNamespace(**symbols)
    compute = dtype_name(step_scalars.t.dtype)
    g = Value(graph, grad, "g")
    inputs.append(Input("g", grad, "element"))
    p = None
    if decays or in_place:
        p = Value(graph, param, "p")
        inputs.append(Input("p", param, "element"))
    statistic = None
    if tensor_rule.statistic is not None:
        statistic = Value(graph, compute, "stat", uniform=True)
        inputs.append(Input("stat", compute, "tensor"))
    old = []
    for n in tensor_rule.buffer_names:
        kind = "tensor" if n in tensor_rule.scalar_buffers else "element"
        dtype = dtype_name(dtypes.get("tensor_state", state)) if kind == "tensor" else state
        inputs.append(Input(f"b_{n}", dtype, kind))
        old.append(Value(graph, dtype, f"b_{n}", uniform=kind == "tensor"))
    rule_grad = -g if negate_grad else g
    update, new = tensor_rule.step_tensor(namespace, step_scalars, rule_grad, p if decays else None,
                                          tuple(old), param, statistic)
    outputs = tuple((f"b_{n}", cast(graph.operand(v), b.dtype), b.dtype)
                    for n, v, b in zip(tensor_rule.buffer_names, new, old))
    update = cast(graph.operand(update), param)
    if in_place:  # what apply_updates and torch's p.add_(update) compute
        outputs += (("p", p + update, param),)
    else:
        outputs += (("update", update, param),)
    return Trace(tuple(inputs), tuple(graph.nodes), outputs, tuple(scalars),
                 tensor_rule.buffer_names, frozenset(tensor_rule.scalar_buffers),
                 {"param": param, "grad": grad, "state": state, "compute": compute})


def literal_c(value: float | bool, dtype: str) -> str:
    """``value`` (exact in ``dtype``) as an exact C literal of the dtype's C type."""
    if dtype == BOOL:
        return "true" if value else "false"
    suffix = "" if dtype == DOUBLE else "f"
    ctype = "double" if dtype == DOUBLE else "float"
    if math.isnan(value):
        return f"(({ctype})NAN)"
    if math.isinf(value):
        return f"(({ctype}){'-' if value < 0 else ''}INFINITY)"
    return f"{float(value).hex()}{suffix}"


def literal(value: float, dtype: Any) -> str:
    """``value`` rounded to ``dtype``, as an exact C literal."""
    name = dtype_name(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    return literal_c(round_to(value, name), name)
