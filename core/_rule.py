"""The machinery shared by every rule: state creation, the per-tensor driver, apply_updates.

A rule is defined by a *direction* function that holds its mathematics for one tensor
and a *constants* function for the per-step scalars (bias corrections).  Everything a
rule does not own lives here, once: input checks, the compute dtype, casting of
hyperparameters, coupled and decoupled weight decay, the learning rate, and rebuilding
the caller's structure.  Fast paths reuse the same two functions on other layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Mapping, NamedTuple

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
from ._together import reduced_together

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
    state_arrays = _state_arrays(state)
    grad_list, rebuild = as_array_list("grads", grads)
    param_list = None
    if params is not None:
        param_list, _ = as_array_list("params", params)
        _check_same_structure("params", params, param_list, "grads", grads, grad_list)
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
    labelled += [(f"state.{name}", a) for name, a in _named_state_arrays(state)]
    check_one_device(labelled, [(name, v) for name, v in hyper.items() if is_array(v)])
    return Call(xp, grad_list, param_list, rebuild)


def _check_same_structure(name, value, items, other_name, other, other_items):
    if is_array(value) != is_array(other):
        one, many = (name, other_name) if is_array(value) else (other_name, name)
        raise ValueError(f"{one} is one array but {many} is a sequence: pass both alike")
    if len(items) != len(other_items):
        raise ValueError(f"{name} has {_arrays(len(items))} but {other_name} has "
                         f"{_arrays(len(other_items))}: one per tensor is needed in each")


def _arrays(n: int) -> str:
    return f"{n} array" if n == 1 else f"{n} arrays"


def _state_arrays(state: Any) -> list:
    """The arrays of a state, after checking that its fields are tuples of arrays."""
    return [a for _, a in _named_state_arrays(state)]


def _named_state_arrays(state: Any) -> list[tuple[str, Any]]:
    out = [("count", state.count)]
    for name, arrays in zip(state._fields[1:], state[1:]):
        if not isinstance(arrays, tuple):
            raise TypeError(f"state.{name} is a {type(arrays).__name__}: a rule's state holds "
                            "tuples of arrays, as its init made them")
        for i, a in enumerate(arrays):
            if not is_array(a):
                raise TypeError(f"state.{name}[{i}] is a {type(a).__name__}, not an array")
            out.append((f"{name}[{i}]", a))
    return out


def check_state_type(rule_name: str, state_type: type, state: Any) -> None:
    if type(state) is state_type:
        return
    owner = _STATE_OWNERS.get(type(state))
    made_by = f"was made by {owner}_init" if owner else f"is a {type(state).__name__}"
    raise TypeError(
        f"state {made_by}, but {rule_name}_update needs the {state_type.__name__} "
        f"returned by {rule_name}_init"
    )


# The count is an int32 that never wraps: it stops at the largest int32, long after the
# bias corrections have reached one (a wrapped count would make them negative).
COUNT_MAX = 2 ** 31 - 1


def _check_count(xp: Any, count: Any) -> None:
    """The count's kind, never its value (it may be traced): a 0-d integer array whose
    dtype holds 0..COUNT_MAX.  Booleans are not integers here; a narrower integer would
    wrap long before COUNT_MAX."""
    if not is_array(count) or count.ndim != 0 or not xp.isdtype(count.dtype, "integral"):
        raise TypeError("state.count must be a 0-d integer array, as made by the rule's init")
    if xp.iinfo(count.dtype).max < COUNT_MAX:
        raise TypeError(f"state.count has dtype {count.dtype}, which cannot hold counts up to "
                        f"2**31 - 1: the rule's init makes an int32 count")


def new_count(xp: Any, like: Any) -> Any:
    return xp.zeros((), dtype=xp.int32, device=device_or_none(like))


def next_count(xp: Any, count: Any) -> Any:
    """``count + 1``, saturating at :data:`COUNT_MAX` instead of wrapping; array
    arithmetic only (no value is read: jit-friendly, no device synchronisation)."""
    return as_array(xp, count + xp.astype(count < COUNT_MAX, count.dtype))


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


def default_state_dtype(xp: Any, param_dtype: Any, state_dtype: Any = None) -> Any:
    """The dtype of a parameter's state buffers: ``state_dtype`` when given, else the
    parameter's own, except float16 and bfloat16 (fewer than 32 bits), whose state is
    float32: a bfloat16 second moment cannot decay at b2 = 0.999 (its 8-bit mantissa
    rounds b2 v back to v) and a float16 one underflows below 6e-8 (g ~ 2e-4) or
    overflows above 65504."""
    if state_dtype is not None:
        return state_dtype
    return xp.float32 if xp.finfo(param_dtype).bits < 32 else param_dtype


def compute_dtype(xp: Any, *dtypes: Any) -> Any:
    """The dtype a tensor's step is computed in: the widest of its dtypes (gradient, state,
    parameter), at least float32.

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


def bias_corrections(xp: Any, step: Any) -> dict:
    """``bc1 = 1 - b1^t`` and ``bc2 = 1 - b2^t``, the constants of most Adam-type rules,
    and their reciprocals ``inv_bc1``, ``inv_bc2``.  The rules multiply by the
    reciprocals: a division per element costs several multiplications on every
    processor, and the bias corrections are scalars, inverted once per step (one more
    rounding, within a unit in the last place)."""
    bc1, bc2 = one_minus_power(xp, step.b1, step.t), one_minus_power(xp, step.b2, step.t)
    return {"bc1": bc1, "bc2": bc2, "inv_bc1": 1 / bc1, "inv_bc2": 1 / bc2}


def guard(xp: Any, dtype: Any, value: float) -> float:
    """A small positive constant that stays representable (not subnormal) in ``dtype``."""
    return max(value, float(xp.finfo(dtype).smallest_normal))


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a kernel cache key
class TensorRule:
    """A rule computed tensor by tensor from ``direction`` and ``constants``.

    ``direction(xp, g, p, buffers, step) -> (d, new_buffers)`` computes one tensor's step
    direction (the update is ``-lr * d``, plus decoupled weight decay); ``step`` holds the
    hyperparameters cast to the compute dtype, the step ``step.t`` and what
    ``constants(xp, step)`` adds.  ``p`` is the parameter when weight decay is on, else None.

    A rule whose direction needs a reduction of the whole tensor (NovoGrad's squared
    norm) names it ``statistic(xp, g)``; ``direction`` then takes its value as a sixth
    argument.  :meth:`update` computes the statistics of all tensors before any
    direction and combines them (:func:`reduced_together`), so that on arrays sharded
    over processes they cost one collective per step, not one per tensor.
    """

    name: str
    state_type: type
    direction: Callable
    constants: Callable[[Any, SimpleNamespace], dict]
    scalar_buffers: frozenset = frozenset()  # buffers holding one value per tensor
    decay_inside: bool = False  # weight decay is part of the direction (NovoGrad)
    check: Callable[[dict], None] | None = None  # relations between hyperparameters
    statistic: Callable | None = None  # a per-tensor reduction the direction takes
    ranges: Mapping[str, str] = field(default_factory=dict)  # hyperparameter -> range name

    def __post_init__(self) -> None:
        register_state_type(self.state_type, self.name)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        return self.state_type._fields[1:]

    def init(self, params: Any, state_dtype: Any = None) -> Any:
        xp, arrays = checked_params(params)
        dtype = resolve_dtype(xp, state_dtype)
        buffers = {name: tuple(self._zeros(xp, name, p, default_state_dtype(xp, p.dtype, dtype))
                               for p in arrays)
                   for name in self.buffer_names}
        return self.state_type(count=new_count(xp, arrays[0]), **buffers)

    def _zeros(self, xp: Any, name: str, p: Any, dtype: Any) -> Any:
        if name in self.scalar_buffers:
            # One number per tensor (a squared norm) costs nothing to keep in float32 at
            # least, and would overflow float16 for any sizeable tensor.
            wide = xp.result_type(dtype, xp.float32)
            return xp.zeros((), dtype=wide, device=device_or_none(p))
        return xp.zeros_like(p, dtype=dtype, device=device_or_none(p))

    def checked_hyperparameters(self, hyper: dict[str, Any]) -> dict[str, Any]:
        """``hyper`` normalised, or the error an update with them would raise."""
        hyper = normalise_hyperparameters(hyper, self.ranges)
        if self.check is not None:
            self.check(hyper)
        return hyper

    def checked_call(self, state: Any, grads: Any, params: Any,
                     hyper: dict[str, Any]) -> tuple[Call, dict]:
        """Every check an update makes before computing, and its normalised inputs.
        Fast paths call it too, so that they refuse exactly what the rule refuses."""
        hyper = self.checked_hyperparameters(hyper)
        call = open_call(self.name, self.state_type, state, grads, params, hyper)
        self._check_buffers(call, state)
        if self.decays(hyper) and call.params is None:
            raise ValueError(
                f"{self.name}_update got weight_decay={hyper['weight_decay']!r} but no params: "
                "weight decay needs the parameters (pass params=...)"
            )
        return call, hyper

    def update(self, state: Any, grads: Any, params: Any, hyper: dict[str, Any]) -> tuple:
        call, hyper = self.checked_call(state, grads, params, hyper)
        decayed = self.decays(hyper)
        xp = call.xp
        count = next_count(xp, state.count)
        scalars: dict[Any, SimpleNamespace] = {}
        tensors = []
        for i, g in enumerate(call.grads):
            p = None if call.params is None else call.params[i]
            old = tuple(getattr(state, name)[i] for name in self.buffer_names)
            dtype = compute_dtype(xp, g.dtype, old[0].dtype, *([] if p is None else [p.dtype]))
            if dtype not in scalars:
                scalars[dtype] = self.scalars(xp, count, dtype, hyper)
            tensors.append((g, p, old, scalars[dtype]))
        statistics = self.statistics(xp, [(g, step.t.dtype) for g, _, _, step in tensors])
        updates, buffer_lists = [], [[] for _ in self.buffer_names]
        for (g, p, old, step), statistic in zip(tensors, statistics):
            update, new = self.step_tensor(xp, step, g, p if decayed else None, old,
                                           g.dtype if p is None else p.dtype, statistic)
            updates.append(as_array(xp, update))
            for buffer_list, b in zip(buffer_lists, new):
                buffer_list.append(as_array(xp, b))
        new_state = self.state_type(count, *(tuple(buffer_list) for buffer_list in buffer_lists))
        return call.rebuild(updates), new_state

    compute_dtype = staticmethod(compute_dtype)  # for fast paths: one rule of promotion

    def statistics(self, xp: Any, grads: list[tuple[Any, Any]]) -> list:
        """The statistic of each ``(gradient, compute dtype)``, all reduced together
        (Nones for a rule without one).  They are combined in the widest dtype and
        read back in each tensor's own, which the widening leaves exact."""
        if self.statistic is None or not grads:
            return [None] * len(grads)
        wide = xp.result_type(*(dtype for _, dtype in grads))
        partials = [self.statistic(xp, xp.astype(g, dtype, copy=False)) for g, dtype in grads]
        partials = [xp.astype(s, wide, copy=False) for s in partials]
        combined = reduced_together(xp, partials)
        return [xp.astype(combined[i], dtype, copy=False) for i, (_, dtype) in enumerate(grads)]

    @staticmethod
    def decays(hyper: dict) -> bool:
        """Whether weight decay is on: for anything but a Python zero (an array is never
        read, so an array weight decay counts as on)."""
        return not is_zero(hyper.get("weight_decay", 0.0))

    def scalars(self, xp: Any, count: Any, dtype: Any, hyper: dict,
                hyper_dtype: Any = None) -> SimpleNamespace:
        """The step's scalars in ``dtype``: the hyperparameters, the step ``t`` (the new
        count) and the rule's constants (bias corrections).

        Array hyperparameters are cast to ``hyper_dtype`` (default ``dtype``).  A wider
        one suits libraries that compute a 0-d array with a wider dtype in the other
        operand's dtype (PyTorch): the array then acts as a Python number does, so that
        ``1 - b2`` is formed before rounding rather than after."""
        values = {k: cast(xp, v, hyper_dtype or dtype) for k, v in hyper.items()}
        values["t"] = xp.astype(count, dtype)
        values["coupled"] = hyper.get("coupled_weight_decay", False)
        values.update(self.constants(xp, SimpleNamespace(**values)))
        return SimpleNamespace(**values)

    def step_tensor(self, xp: Any, step: SimpleNamespace, g: Any, p: Any, old: tuple,
                    out_dtype: Any, statistic: Any = None) -> tuple[Any, tuple]:
        """One tensor's update (in ``out_dtype``) and new buffers (in their old dtypes),
        computed in the dtype of ``step``.  ``p`` is the parameter if weight decay is on,
        else None.  Fast paths call this with other layouts of the same numbers.

        For a rule with a ``statistic``, its value is computed here unless given (the
        gradient's, in the compute dtype, before any weight decay)."""
        dtype = step.t.dtype
        g = xp.astype(g, dtype, copy=False)
        extra = ()
        if self.statistic is not None:
            extra = (self.statistic(xp, g) if statistic is None else statistic,)
        if p is not None:
            p = xp.astype(p, dtype, copy=False)
            if step.coupled:
                g = g + step.weight_decay * p
        buffers = tuple(xp.astype(b, dtype, copy=False) for b in old)
        d, new = self.direction(xp, g, p, buffers, step, *extra)
        if p is not None and not step.coupled and not self.decay_inside:
            d = d + step.weight_decay * p
        new = tuple(xp.astype(b, b_old.dtype, copy=False) for b, b_old in zip(new, old))
        # (-lr) * d is -(lr * d) exactly (rounding is symmetric in sign), one operation less
        return xp.astype((-step.lr) * d, out_dtype, copy=False), new

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
    _check_same_structure("params", params, param_list, "updates", updates, update_list)
    xp = namespace_of(param_list + update_list)
    new = []
    for i, (p, u) in enumerate(zip(param_list, update_list)):
        check_real_floating(xp, f"params[{i}]", p)
        check_real_floating(xp, f"updates[{i}]", u)  # a complex one would lose its imaginary part
        check_same_shape(f"updates[{i}]", u, f"params[{i}]", p)
        new.append(as_array(xp, p + xp.astype(u, p.dtype, copy=False)))
    return rebuild(new)
