"""Checking and normalising what a caller hands to a rule.

Every public function of the core resolves the array namespace once, through
:func:`namespace_of`, and refuses bad input here, before any array is computed, so
that a refused call leaves nothing half-done.  Nothing in this module reads an
array's *values*: the checks look at types, shapes, dtypes and devices only, which
keeps the rules traceable by ``jax.jit`` and ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, Callable, Sequence

import array_api_compat

# Hyperparameters by the range they must lie in.  The names are the public keyword
# names of every rule; a rule checks only the ones it takes.
NON_NEGATIVE = frozenset({"lr", "eps_s", "weight_decay"})
# eps is what keeps 0/0 out of a zero gradient's step: it must stay positive in the
# compute dtype, which is at least float32 (whose smallest normal number is 2**-126).
POSITIVE = frozenset({"eps"})
FLOAT32_TINY = 2.0 ** -126
UNIT_INTERVAL = frozenset({"b1", "b2", "b2_min", "b2_max", "momentum"})  # [0, 1)
FLAGS = frozenset({"coupled_weight_decay", "nesterov", "grad_averaging", "rectify"})


def is_array(value: Any) -> bool:
    return array_api_compat.is_array_api_obj(value)


def as_array_list(name: str, value: Any) -> tuple[list, Callable[[list], Any]]:
    """``value`` as a list of arrays, and a function rebuilding the caller's structure.

    One array is returned as a one-element list; a list, tuple or NamedTuple keeps its type.
    """
    if is_array(value):
        return [value], _first
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if not is_array(item):
                raise TypeError(
                    f"{name}[{i}] is a {type(item).__name__}, not an array: {name} must be "
                    "one array or a flat list/tuple of arrays (flatten pytrees first, or "
                    "use the optax adapter)"
                )
        return list(value), _rebuilder(type(value))
    raise TypeError(
        f"{name} is a {type(value).__name__}: expected one array or a flat list/tuple of arrays"
    )


def _first(items: list) -> Any:
    return items[0]


def _rebuilder(kind: type) -> Callable[[list], Any]:
    if kind in (list, tuple):
        return kind
    if hasattr(kind, "_make"):  # a NamedTuple
        return kind._make
    return kind


def namespace_of(arrays: Sequence[Any]) -> Any:
    """The one Array-API namespace of ``arrays``; a clear error if they mix libraries."""
    one_per_type: dict[type, Any] = {}
    for a in arrays:
        one_per_type.setdefault(type(a), a)
    try:
        return array_api_compat.array_namespace(*one_per_type.values())
    except TypeError:
        kinds = ", ".join(sorted(f"{t.__module__}.{t.__qualname__}" for t in one_per_type))
        raise TypeError(
            f"arrays of different array libraries were mixed ({kinds}); grads, params, "
            "state and array hyperparameters must all come from one namespace"
        ) from None


def _traced(a: Any) -> bool:
    """Whether ``a`` is a JAX tracer (an array of a function being traced, as under
    ``jax.jit``): asked for its device, it raises an error whose message takes time in
    proportion to the traced program, seconds over a thousand tensors.  (JAX is not
    imported here: only looked up where it has been.)"""
    jax = sys.modules.get("jax")
    tracer = getattr(getattr(jax, "core", None), "Tracer", None)
    return tracer is not None and isinstance(a, tracer)


def device_or_none(a: Any) -> Any:
    """The array's device, or None where the library cannot say (e.g. a traced array),
    where the array has no single device (a JAX array sharded over several), or where
    it says it is not committed to one (a JAX array on its default placement).

    New state is made on this device; None makes it where the library puts arrays by
    default.  For an uncommitted JAX array that keeps the state uncommitted too: mixing
    committed state with uncommitted params would make ``jax.jit`` compile twice.
    """
    if _traced(a):
        return None
    try:
        if getattr(a, "committed", True) is False:
            return None
        device = array_api_compat.device(a)
    except Exception:  # traced arrays have no device (nor a committed flag)
        return None
    # A JAX array laid over several devices reports its sharding, not a device; two
    # such arrays may be laid out differently on the same devices, which is legal.
    return None if len(getattr(device, "device_set", ())) > 1 else device


def check_one_device(labelled: Sequence[tuple[str, Any]]) -> None:
    """Refuse arrays spread over several devices."""
    first_label, first_device = None, None
    for label, a in labelled:
        dev = device_or_none(a)
        if dev is None:
            continue
        if first_device is None:
            first_label, first_device = label, dev
        elif dev != first_device:
            raise ValueError(
                f"{label} is on device {dev} but {first_label} is on {first_device}; "
                "move all arrays of one call to one device"
            )


def check_real_floating(xp: Any, label: str, a: Any) -> None:
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(
            f"{label} has dtype {a.dtype}: optimizer rules need real floating arrays "
            "(integer, boolean and complex arrays are refused)"
        )


def check_same_shape(label: str, a: Any, reference_label: str, reference: Any) -> None:
    if tuple(a.shape) != tuple(reference.shape):
        raise ValueError(
            f"{label} has shape {tuple(a.shape)} but {reference_label} has shape "
            f"{tuple(reference.shape)}"
        )


def resolve_dtype(xp: Any, dtype: Any, name: str = "state_dtype") -> Any:
    """A real floating dtype of ``xp`` from a dtype object or its name; None stays None."""
    if dtype is None:
        return None
    given = dtype  # the errors name what the caller passed, not what it resolved to
    if isinstance(dtype, str):
        dtype = getattr(xp, dtype, None)
        if dtype is None:
            raise ValueError(f"{name}={given!r} is not a dtype of {xp.__name__}")
    try:
        floating = xp.isdtype(dtype, "real floating")
    except Exception:
        floating = False
    if not floating:
        raise TypeError(f"{name}={given!r} is not a real floating dtype of {xp.__name__}")
    return dtype


def normalise_hyperparameters(values: dict[str, Any]) -> dict[str, Any]:
    """Check each hyperparameter's type and, for Python numbers, its range.

    Returns the values with NumPy scalars turned into Python floats.  Values given as
    0-d arrays are checked for shape and dtype only: they may be traced, and reading
    them would break ``jax.jit`` or force a device synchronisation.
    """
    out = {}
    for name, value in values.items():
        if name in FLAGS:
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
            out[name] = value
        elif isinstance(value, bool):
            raise TypeError(f"{name} must be a number or a 0-d array, got {value!r}")
        elif isinstance(value, numbers.Real):
            out[name] = _checked_number(name, float(value))
        elif is_array(value):
            out[name] = _checked_array(name, value)
        else:
            raise TypeError(
                f"{name} must be a number or a 0-d array, got a {type(value).__name__}"
            )
    return out


def _checked_number(name: str, value: float) -> float:
    if name in UNIT_INTERVAL and not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} is out of range: it must lie in [0, 1)")
    if name in NON_NEGATIVE and not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name}={value!r} is out of range: it must be finite and >= 0")
    if name in POSITIVE and not (math.isfinite(value) and value >= FLOAT32_TINY):
        raise ValueError(f"{name}={value!r} is out of range: it must be finite and at least "
                         f"{FLOAT32_TINY:.3g} (smaller values vanish in float32 arithmetic)")
    return value


def _checked_array(name: str, value: Any) -> Any:
    if value.ndim != 0:
        raise ValueError(
            f"{name} must be a number or a 0-d array, got an array of shape {tuple(value.shape)}"
        )
    xp = array_api_compat.array_namespace(value)
    if not xp.isdtype(value.dtype, ("real floating", "integral")):
        raise TypeError(f"{name} has dtype {value.dtype}: a real number is needed")
    return value


def is_zero(value: Any) -> bool:
    """True only for a Python number equal to zero (an array is never known to be zero)."""
    return isinstance(value, float) and value == 0.0
