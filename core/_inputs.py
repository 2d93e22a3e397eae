"""Checking and normalising what a caller hands to a rule.

Every public function of the core resolves the array namespace once, through
:func:`namespace_of`, and refuses bad input here, before any array is computed, so
that a refused call leaves nothing half-done.  Nothing in this module reads an
array's *values*: the checks look at types, shapes, dtypes and devices only, which
keeps the rules traceable by ``jax.jit`` and ``torch.compile``.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any, Callable, Mapping, Sequence

import array_api_compat

# The ranges a hyperparameter given as a Python number must lie in, by the name a rule's
# declaration gives (``Hyperparameter.range``).
#
# eps is what keeps 0/0 out of a zero gradient's step, and what bounds a normalized
# gradient g / (sqrt(v) + eps) where the second moment vanishes (MVN-Grad's residual
# variance with eps_s = 0, Adam's v after a spike): |g| / eps.  Steps are computed in
# float32 at least, whose gradients are supported up to sqrt(max) / 4 ~ 2**62 (so that
# g**2 is finite), and whose largest number is ~2**128: eps >= 2**-64 keeps |g| / eps
# below 2**126, with room for the averages and bias corrections that follow.
EPS_MIN = 2.0 ** -64
# Python numbers enter the arithmetic as numbers of the compute dtype (float32 at
# least): a larger one would become Inf there, and Inf * 0 is NaN.
FLOAT32_MAX = float.fromhex("0x1.fffffep+127")
RANGES = {  # what a value must do, as an error message says it
    "unit": "lie in [0, 1)",
    "non_negative": f"be >= 0 and at most {FLOAT32_MAX:.4g} (float32's largest number; steps "
                    "compute in float32 at least)",
    "eps": f"be at least 2**-64 ({EPS_MIN:.3g}; below it g / eps overflows float32 for "
           f"gradients of the supported range) and at most {FLOAT32_MAX:.4g}",
    "flag": "be True or False",
    "option": "be one of the rule's options",  # the rule's own check says which
}
_BOUNDS = {"unit": (0.0, 1.0, False), "non_negative": (0.0, FLOAT32_MAX, True),
           "eps": (EPS_MIN, FLOAT32_MAX, True)}


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
        xp = array_api_compat.array_namespace(*one_per_type.values())
    except TypeError:
        kinds = ", ".join(sorted(f"{t.__module__}.{t.__qualname__}" for t in one_per_type))
        raise TypeError(
            f"arrays of different array libraries were mixed ({kinds}); grads, params, "
            "state and array hyperparameters must all come from one namespace"
        ) from None
    if any(t.__name__ == "DTensor" for t in one_per_type):
        return _OutOfPlace(xp)
    return xp


class _OutOfPlace:
    """The namespace array-api-compat gives for PyTorch, for DTensors: its functions
    but those it computes in place, which a sharded tensor may refuse (its ``sign``
    writes NaN into its result by a masked assignment), written from other functions
    of the standard."""

    def __init__(self, xp: Any) -> None:
        self._xp = xp
        self.__name__ = xp.__name__

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xp, name)

    def sign(self, x: Any) -> Any:
        # +1, -1, +0 for either zero (x - x), NaN for NaN: the standard's sign
        one = self._xp.ones_like(x)
        return self._xp.where(x > 0, one, self._xp.where(x < 0, -one, x - x))


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


def check_one_device(labelled: Sequence[tuple[str, Any]],
                     scalars: Sequence[tuple[str, Any]] = ()) -> None:
    """Refuse arrays spread over several devices.  ``scalars`` (0-d hyperparameters)
    may also be where their library computes with them on any device: a PyTorch 0-d
    tensor on the CPU acts as a Python number does."""
    first_label, first_device = None, None
    for label, a in [*labelled, *scalars]:
        dev = device_or_none(a)
        if dev is None or (first_device is not None and dev == first_device):
            continue
        if first_device is None:
            first_label, first_device = label, dev
        elif not (label in dict(scalars) and _usable_on_any_device(a)):
            raise ValueError(
                f"{label} is on device {dev} but {first_label} is on {first_device}; "
                "move all arrays of one call to one device"
            )


def _usable_on_any_device(a: Any) -> bool:
    return array_api_compat.is_torch_array(a) and a.device.type == "cpu"


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


def normalise_hyperparameters(values: dict[str, Any], ranges: Mapping[str, str]
                              ) -> dict[str, Any]:
    """Check each hyperparameter's type and, for Python numbers, that it lies in its
    range (``ranges``: by name, a key of :data:`RANGES`).

    Returns the values with NumPy scalars turned into Python floats.  Values given as
    0-d arrays are checked for shape and dtype only: they may be traced, and reading
    them would break ``jax.jit`` or force a device synchronisation.
    """
    out = {}
    for name, value in values.items():
        kind = ranges[name]
        if kind == "option":
            out[name] = value
        elif kind == "flag":
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
            out[name] = value
        elif isinstance(value, bool):
            raise TypeError(f"{name} must be a number or a 0-d array, got {value!r}")
        elif isinstance(value, numbers.Real):
            out[name] = _checked_number(name, _as_float(name, value), kind)
        elif is_array(value):
            out[name] = _checked_array(name, value)
        else:
            raise TypeError(
                f"{name} must be a number or a 0-d array, got a {type(value).__name__}"
            )
    return out


def _as_float(name: str, value: numbers.Real) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float, e.g. 10**400
        raise ValueError(f"{name} (an integer of {len(str(abs(int(value))))} digits) is out of "
                         "range: it is larger than any floating-point number") from None


def _checked_number(name: str, value: float, kind: str) -> float:
    low, high, closed = _BOUNDS[kind]
    if not (low <= value <= high if closed else low <= value < high):
        raise ValueError(f"{name}={value!r} is out of range: it must {RANGES[kind]}")
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
