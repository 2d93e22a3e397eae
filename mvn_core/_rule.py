"""The machinery shared by every rule: state creation, the per-tensor driver, apply_updates.

A rule is defined by a *direction* function that holds its mathematics for one tensor
and a *constants* function for the per-step scalars (bias corrections).  Everything a
rule does not own lives here, once: input checks, the compute dtype, casting of
hyperparameters, coupled and decoupled weight decay, the learning rate, and rebuilding
the caller's structure.  Fast paths reuse the same two functions on other layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

from ._inputs import (
    as_array_list,
    check_one_device,
    check_real_floating,
    check_same_shape,
    device_or_none,
    is_array,
    is_zero,
    namespace_of,
    normalise_hyperparameters,
    resolve_dtype,
)

# State type -> name of the rule that made it, to name the culprit of a mix-up.
_STATE_OWNERS: dict[type, str] = {}


def register_state_type(state_type: type, rule_name: str) -> None:
    _STATE_OWNERS[state_type] = rule_name


class Call(NamedTuple):
    """One checked call: the namespace, the grads and params as lists, and the structure."""

    xp: Any
    grads: list
    params: list | None
    rebuild: Callable[[list], Any]


def open_call(rule_name: str, state_type: type, state: Any, grads: Any, params: Any,
              hyper: dict[str, Any]) -> Call:
    """Check everything a rule's update receives that does not depend on the rule."""
    check_state_type(rule_name, state_type, state)
    grad_list, rebuild = as_array_list("grads", grads)
    param_list = None
    if params is not None:
        param_list, _ = as_array_list("params", params)
        if is_array(grads) != is_array(params) or len(param_list) != len(grad_list):
            raise ValueError(
                f"params ({_describe(params)}) and grads ({_describe(grads)}) differ in "
                "structure: pass them as the same kind of container with one array per tensor"
            )
    state_arrays = [a for field in state for a in (field if isinstance(field, tuple) else (field,))]
    hyper_arrays = [v for v in hyper.values() if is_array(v)]
    xp = namespace_of(grad_list + (param_list or []) + state_arrays + hyper_arrays)
    for i, g in enumerate(grad_list):
        check_real_floating(xp, f"grads[{i}]", g)
    for i, p in enumerate(param_list or []):
        check_real_floating(xp, f"params[{i}]", p)
        check_same_shape(f"params[{i}]", p, f"grads[{i}]", grad_list[i])
    _check_count(xp, state.count)
    labelled = [(f"grads[{i}]", g) for i, g in enumerate(grad_list)]
    labelled += [(f"params[{i}]", p) for i, p in enumerate(param_list or [])]
    check_one_device(labelled)
    return Call(xp, grad_list, param_list, rebuild)


def check_state_type(rule_name: str, state_type: type, state: Any) -> None:
    if type(state) is state_type:
        return
    owner = _STATE_OWNERS.get(type(state))
    made_by = f"was made by {owner}_init" if owner else f"is a {type(state).__name__}"
    raise TypeError(
        f"state {made_by}, but {rule_name}_update needs the {state_type.__name__} "
        f"returned by {rule_name}_init"
    )


def _check_count(xp: Any, count: Any) -> None:
    if not is_array(count) or count.ndim != 0 or not xp.isdtype(count.dtype, "integral"):
        raise TypeError("state.count must be a 0-d integer array, as made by the rule's init")


def _describe(value: Any) -> str:
    if is_array(value):
        return "one array"
    return f"a {type(value).__name__} of {len(value)}"


def new_count(xp: Any, like: Any) -> Any:
    return xp.zeros((), dtype=xp.int32, device=device_or_none(like))


def checked_params(params: Any) -> tuple[Any, list]:
    """The namespace and the list of arrays of an init's ``params``."""
    arrays, _ = as_array_list("params", params)
    if not arrays:
        raise ValueError("params is empty: there is nothing to optimize")
    xp = namespace_of(arrays)
    for i, p in enumerate(arrays):
        check_real_floating(xp, f"params[{i}]", p)
    check_one_device([(f"params[{i}]", p) for i, p in enumerate(arrays)])
    return xp, arrays


def compute_dtype(xp: Any, *dtypes: Any) -> Any:
    """The dtype a tensor's step is computed in: the widest of its dtypes, at least float32.

    Half-precision inputs are computed in float32 (stored back in their own dtype), as
    fused kernels do, so that eps-sized constants do not underflow to zero.
    """
    return xp.result_type(*dtypes, xp.float32)


def as_array(xp: Any, x: Any) -> Any:
    # NumPy turns 0-d results into scalars; the contract promises arrays.
    return xp.asarray(x) if x.ndim == 0 else x


def cast(xp: Any, value: Any, dtype: Any) -> Any:
    """A hyperparameter in ``dtype``: Python numbers stay weak scalars, arrays are cast."""
    return xp.astype(value, dtype, copy=False) if is_array(value) else value


def one_minus_power(xp: Any, base: Any, t: Any) -> Any:
    """``1 - base**t`` for the step ``t`` (an array), computed as ``-expm1(t log base)``.

    The direct form loses most digits when ``base**t`` is close to one (``b2 = 0.999``
    in float32 gives ``1 - b2`` with a relative error of 1e-5); this one keeps the
    relative error at a few units in the last place.
    """
    if is_array(base):
        positive = base > 0
        log_base = xp.log(xp.where(positive, base, xp.ones_like(base)))
        log_base = xp.where(positive, log_base, xp.full_like(log_base, -math.inf))
    else:
        log_base = math.log(base) if base > 0 else -math.inf
    return -xp.expm1(t * log_base)


def guard(xp: Any, dtype: Any, value: float) -> float:
    """A small positive constant that stays representable (not subnormal) in ``dtype``."""
    return max(value, float(xp.finfo(dtype).smallest_normal))


@dataclass(frozen=True)
class TensorRule:
    """A rule computed tensor by tensor from ``direction`` and ``constants``.

    ``direction(xp, g, p, buffers, c) -> (d, new_buffers)`` computes one tensor's step
    direction (the update is ``-lr * d``, plus decoupled weight decay); ``c`` holds the
    hyperparameters cast to the compute dtype, the step ``c.t`` and what
    ``constants(xp, c)`` adds.  ``p`` is the parameter when weight decay is on, else None.
    """

    name: str
    state_type: type
    direction: Callable
    constants: Callable[[Any, SimpleNamespace], dict]
    scalar_buffers: frozenset = frozenset()  # buffers holding one value per tensor
    decay_inside: bool = False  # weight decay is part of the direction (NovoGrad)
    check: Callable[[dict], None] | None = None  # relations between hyperparameters

    def __post_init__(self) -> None:
        register_state_type(self.state_type, self.name)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        return self.state_type._fields[1:]

    def init(self, params: Any, state_dtype: Any = None) -> Any:
        xp, arrays = checked_params(params)
        dtype = resolve_dtype(xp, state_dtype)
        buffers = {name: tuple(self._zeros(xp, name, p, dtype) for p in arrays)
                   for name in self.buffer_names}
        return self.state_type(count=new_count(xp, arrays[0]), **buffers)

    def _zeros(self, xp: Any, name: str, p: Any, dtype: Any) -> Any:
        if name in self.scalar_buffers:
            return xp.zeros((), dtype=dtype or p.dtype, device=device_or_none(p))
        return xp.zeros_like(p, dtype=dtype)

    def checked_hyperparameters(self, hyper: dict[str, Any]) -> dict[str, Any]:
        """``hyper`` normalised, or the error an update with them would raise."""
        hyper = normalise_hyperparameters(hyper)
        if self.check is not None:
            self.check(hyper)
        return hyper

    def update(self, state: Any, grads: Any, params: Any, hyper: dict[str, Any]) -> tuple:
        hyper = self.checked_hyperparameters(hyper)
        call = open_call(self.name, self.state_type, state, grads, params, hyper)
        self._check_buffers(call, state)
        decayed = not is_zero(hyper.get("weight_decay", 0.0))
        if decayed and call.params is None:
            raise ValueError(
                f"{self.name}_update got weight_decay={hyper['weight_decay']!r} but no params: "
                "weight decay needs the parameters (pass params=...)"
            )
        coupled = hyper.get("coupled_weight_decay", False)
        xp = call.xp
        count = as_array(xp, state.count + 1)
        scalars: dict[Any, SimpleNamespace] = {}
        updates, columns = [], [[] for _ in self.buffer_names]
        for i, g in enumerate(call.grads):
            old = tuple(getattr(state, name)[i] for name in self.buffer_names)
            dtype = compute_dtype(xp, g.dtype, old[0].dtype)
            if dtype not in scalars:
                scalars[dtype] = self._scalars(xp, count, dtype, hyper)
            c = scalars[dtype]
            gc = xp.astype(g, dtype, copy=False)
            p = xp.astype(call.params[i], dtype, copy=False) if decayed else None
            if decayed and coupled:
                gc = gc + c.weight_decay * p
            d, new = self.direction(xp, gc, p, tuple(xp.astype(b, dtype, copy=False) for b in old), c)
            if decayed and not coupled and not self.decay_inside:
                d = d + c.weight_decay * p
            updates.append(as_array(xp, xp.astype(-(c.lr * d), g.dtype, copy=False)))
            for column, b, b_old in zip(columns, new, old):
                column.append(as_array(xp, xp.astype(b, b_old.dtype, copy=False)))
        new_state = self.state_type(count, *(tuple(column) for column in columns))
        return call.rebuild(updates), new_state

    def _scalars(self, xp: Any, count: Any, dtype: Any, hyper: dict) -> SimpleNamespace:
        c = SimpleNamespace(**{k: cast(xp, v, dtype) for k, v in hyper.items()})
        c.t = xp.astype(count, dtype)
        for key, value in self.constants(xp, c).items():
            setattr(c, key, value)
        return c

    def _check_buffers(self, call: Call, state: Any) -> None:
        n = len(call.grads)
        for name in self.buffer_names:
            buffers = getattr(state, name)
            if not isinstance(buffers, tuple) or len(buffers) != n:
                held = len(buffers) if isinstance(buffers, tuple) else type(buffers).__name__
                raise ValueError(
                    f"state.{name} holds {held} arrays but grads has {n}: the state was made "
                    "for other parameters"
                )
            for i, (b, g) in enumerate(zip(buffers, call.grads)):
                check_real_floating(call.xp, f"state.{name}[{i}]", b)
                if name in self.scalar_buffers:
                    if b.ndim != 0:
                        raise ValueError(f"state.{name}[{i}] must be 0-d, got shape {tuple(b.shape)}")
                else:
                    check_same_shape(f"state.{name}[{i}]", b, f"grads[{i}]", g)


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates``, tensor by tensor, in the params' dtypes; the structure of params.

    Nothing is modified in place: new arrays are returned.
    """
    param_list, rebuild = as_array_list("params", params)
    update_list, _ = as_array_list("updates", updates)
    if is_array(params) != is_array(updates) or len(param_list) != len(update_list):
        raise ValueError(
            f"params ({_describe(params)}) and updates ({_describe(updates)}) differ in structure"
        )
    xp = namespace_of(param_list + update_list)
    new = []
    for i, (p, u) in enumerate(zip(param_list, update_list)):
        check_real_floating(xp, f"params[{i}]", p)
        check_same_shape(f"updates[{i}]", u, f"params[{i}]", p)
        new.append(as_array(xp, p + xp.astype(u, p.dtype, copy=False)))
    return rebuild(new)
