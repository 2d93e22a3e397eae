"""A thin Array-API namespace for TensorFlow tensors: the part of the standard the rules use.

TensorFlow's tensors have no ``__array_namespace__``, and array-api-compat has no
namespace for them, so the core could not resolve one from them.  Here a tensor is
wrapped in :class:`Array`, a small object whose ``__array_namespace__`` is this module:
``array_api_compat.array_namespace`` then finds the namespace the standard's way and
the core needs no hook of its own.  ``Array.tensor`` is the wrapped ``tf.Tensor``;
every operation forwards to TensorFlow.  Inside ``tf.function`` the wrapped tensors
are symbolic: the wrapper lives at tracing time only and costs the traced graph nothing.

Implemented, with the 2023.12 semantics, for real floating, integer and boolean dtypes
(this is the subset that ``mvn_core``'s rules use, not the whole standard):

- the array object: ``dtype``, ``shape``, ``ndim``, ``device`` (``"CPU:0"``, ``"GPU:0"``;
  None where TensorFlow does not know it, as inside ``tf.function``); ``+ - * /``, unary ``-``, the six
  comparisons, ``& | ~``; indexing by integers and slices; ``__array__``, ``float()``,
  ``int()`` and ``bool()`` (eager tensors only);
- creation: ``asarray``, ``zeros``, ``zeros_like``, ``ones_like``, ``full_like``;
- elementwise: ``sqrt``, ``sign``, ``log``, ``expm1``, ``isfinite``, ``where``, ``clip``;
- reduction and manipulation: ``sum``, ``stack``;
- data types: ``astype``, ``result_type``, ``isdtype``, ``finfo``, ``iinfo``; ``float16``,
  ``bfloat16`` (not in the standard), ``float32``, ``float64``, ``int32``, ``int64``,
  ``bool``;
- ``__array_namespace_info__()``: devices, default device, dtypes.

Binary operations between arrays of two dtypes promote as the standard says (TensorFlow
itself refuses them); a Python number takes the array's dtype.  The rest of the
standard is absent (an ``AttributeError``), and ``mvn-core check --namespace
mvn_core.backends.tensorflow_namespace`` proves the rules on it against the oracle.
"""

from __future__ import annotations

import builtins
import contextlib
import sys
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

__array_api_version__ = "2023.12"

_FLOATS = (tf.float16, tf.float32, tf.float64)  # by width; bfloat16 is apart
_SIGNED = (tf.int8, tf.int16, tf.int32, tf.int64)
_UNSIGNED = (tf.uint8, tf.uint16, tf.uint32, tf.uint64)


class Array:
    """A ``tf.Tensor`` as an Array-API array of this namespace."""

    __slots__ = ("tensor",)
    __iter__ = None  # not iterable: indexing past the end raises TensorFlow's error
    __hash__ = None  # == is elementwise

    def __init__(self, tensor: tf.Tensor):
        self.tensor = tensor

    def __array_namespace__(self, *, api_version: str | None = None):
        return sys.modules[__name__]

    @property
    def dtype(self) -> tf.DType:
        return self.tensor.dtype

    @property
    def shape(self) -> tuple:
        return tuple(self.tensor.shape.as_list())

    @property
    def ndim(self) -> int:
        return self.tensor.shape.rank

    @property
    def device(self) -> str | None:
        return _short_device(self.tensor.device)

    def __getitem__(self, key):
        return Array(self.tensor[key.tensor if isinstance(key, Array) else key])

    def __neg__(self):
        return Array(-self.tensor)

    def __invert__(self):
        return Array(~self.tensor)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.tensor.numpy(), dtype=dtype)

    def __float__(self) -> float:
        return float(self.tensor.numpy())

    def __int__(self) -> int:
        return int(self.tensor.numpy())

    def __bool__(self) -> builtins.bool:
        return builtins.bool(self.tensor.numpy())

    def __repr__(self) -> str:
        return f"Array({self.tensor!r})"


def _binary(name: str, op) -> None:
    """Install ``__name__`` and its reflected form on :class:`Array`."""
    def forward(self, other):
        a, b = _operands(self, other)
        return Array(op(a, b))

    def reflected(self, other):
        a, b = _operands(self, other)
        return Array(op(b, a))

    setattr(Array, f"__{name}__", forward)
    setattr(Array, f"__r{name}__", reflected)


def _operands(x: Array, other: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """The tensors of ``x`` and ``other`` in one dtype: two arrays promoted by
    :func:`result_type`, a Python number in the array's dtype."""
    if isinstance(other, Array):
        dtype = result_type(x, other)
        return tf.cast(x.tensor, dtype), tf.cast(other.tensor, dtype)
    if isinstance(other, (builtins.bool, int, float)):
        return x.tensor, tf.constant(other, dtype=x.dtype)
    raise TypeError(f"an operand of a {type(other).__name__} with an array of this namespace: "
                    "arrays and Python numbers only")


for _name, _op in (("add", tf.add), ("sub", tf.subtract), ("mul", tf.multiply),
                   ("truediv", tf.divide), ("and", tf.logical_and), ("or", tf.logical_or)):
    _binary(_name, _op)
for _name, _op in (("eq", tf.equal), ("ne", tf.not_equal), ("lt", tf.less),
                   ("le", tf.less_equal), ("gt", tf.greater), ("ge", tf.greater_equal)):
    setattr(Array, f"__{_name}__", lambda self, other, op=_op: Array(op(*_operands(self, other))))


def _short_device(name: str) -> str | None:
    """``CPU:0`` for any spelling of a device (what ``tf.device`` takes); None for an
    unknown one."""
    if not name:
        return None
    spec = tf.DeviceSpec.from_string(name)
    return f"{spec.device_type}:{spec.device_index or 0}"


def _placed(device: Any):
    return contextlib.nullcontext() if device is None else tf.device(device)


def _like(x: Array, value: Any) -> tf.Tensor:
    """``value`` (an array or a Python number) as a tensor of ``x``'s dtype.  A number
    is converted straight to it: ``tf.cast`` of a number would round it to float32 first."""
    if isinstance(value, Array):
        return tf.cast(value.tensor, x.dtype)
    return tf.constant(value, dtype=x.dtype)


# --- creation --------------------------------------------------------------------------------

def asarray(obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> Array:
    """An :class:`Array` of ``obj``: an array, a ``tf.Tensor`` or ``tf.Variable`` (its
    value; sparse ``tf.IndexedSlices`` made dense), a NumPy array or Python numbers."""
    if isinstance(obj, Array):
        tensor = obj.tensor
    elif isinstance(obj, (tf.Tensor, tf.Variable, tf.IndexedSlices)):
        tensor = tf.convert_to_tensor(obj)
    elif isinstance(obj, (np.ndarray, np.generic)):
        tensor = tf.constant(obj)  # its own dtype, then cast: one rounding
    else:
        tensor = tf.constant(obj, dtype=dtype)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tf.cast(tensor, dtype)
    if device is not None or copy:
        with _placed(device):
            tensor = tf.identity(tensor)
    return Array(tensor)


def zeros(shape: Any, *, dtype: Any = None, device: Any = None) -> Array:
    with _placed(device):
        return Array(tf.zeros(shape, dtype=dtype or float32))


def zeros_like(x: Array, /, *, dtype: Any = None, device: Any = None) -> Array:
    with _placed(device):
        return Array(tf.zeros_like(x.tensor, dtype=dtype or x.dtype))


def ones_like(x: Array, /, *, dtype: Any = None, device: Any = None) -> Array:
    with _placed(device):
        return Array(tf.ones_like(x.tensor, dtype=dtype or x.dtype))


def full_like(x: Array, /, fill_value: Any, *, dtype: Any = None, device: Any = None) -> Array:
    with _placed(device):
        return Array(tf.fill(tf.shape(x.tensor), tf.constant(fill_value, dtype=dtype or x.dtype)))


# --- elementwise, reductions, manipulation --------------------------------------------------

def sqrt(x: Array, /) -> Array:
    return Array(tf.sqrt(x.tensor))


def log(x: Array, /) -> Array:
    return Array(tf.math.log(x.tensor))


def expm1(x: Array, /) -> Array:
    return Array(tf.math.expm1(x.tensor))


def sign(x: Array, /) -> Array:
    return Array(tf.math.sign(x.tensor))


def isfinite(x: Array, /) -> Array:
    return Array(tf.math.is_finite(x.tensor))


def where(condition: Array, x1: Any, x2: Any, /) -> Array:
    if isinstance(x1, Array):
        a, b = _operands(x1, x2)
    else:
        b, a = _operands(x2, x1)
    return Array(tf.where(condition.tensor, a, b))


def clip(x: Array, /, min: Any = None, max: Any = None) -> Array:
    """``x`` clipped to ``[min, max]`` (numbers or arrays); NaN stays NaN."""
    out = x.tensor
    if min is not None:
        low = _like(x, min)
        out = tf.where(out < low, low, out)
    if max is not None:
        high = _like(x, max)
        out = tf.where(out > high, high, out)
    return Array(out)


def sum(x: Array, /, *, axis: Any = None, dtype: Any = None, keepdims: builtins.bool = False
        ) -> Array:
    tensor = x.tensor if dtype is None else tf.cast(x.tensor, dtype)
    return Array(tf.reduce_sum(tensor, axis=axis, keepdims=keepdims))


def stack(arrays: Any, /, *, axis: int = 0) -> Array:
    dtype = result_type(*arrays)
    return Array(tf.stack([tf.cast(a.tensor, dtype) for a in arrays], axis=axis))


# --- data types ------------------------------------------------------------------------------

def astype(x: Array, dtype: Any, /, *, copy: builtins.bool = True, device: Any = None) -> Array:
    if x.dtype == dtype and not copy and device is None:
        return x
    with _placed(device):
        return Array(tf.identity(x.tensor) if x.dtype == dtype else tf.cast(x.tensor, dtype))


def isdtype(dtype: Any, kind: Any) -> builtins.bool:
    if isinstance(kind, tuple):
        return any(isdtype(dtype, k) for k in kind)
    if isinstance(kind, tf.DType):
        return dtype == kind
    kinds = {
        "bool": dtype.is_bool,
        "signed integer": dtype in _SIGNED,
        "unsigned integer": dtype in _UNSIGNED,
        "integral": dtype in _SIGNED + _UNSIGNED,
        "real floating": dtype.is_floating,
        "complex floating": dtype.is_complex,
    }
    kinds["numeric"] = kinds["integral"] or kinds["real floating"] or kinds["complex floating"]
    if kind not in kinds:
        raise ValueError(f"unknown dtype kind {kind!r}")
    return kinds[kind]


def result_type(*arrays_and_dtypes: Any) -> tf.DType:
    """The standard's promotion of real floating, integer and boolean dtypes; bfloat16
    with float16 gives float32, as in JAX and PyTorch.  Mixed kinds are refused."""
    dtypes = [a.dtype if isinstance(a, Array) else a for a in arrays_and_dtypes]
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = _promote(out, dtype)
    return out


def _promote(a: tf.DType, b: tf.DType) -> tf.DType:
    if a == b:
        return a
    floats = {tf.bfloat16, *_FLOATS}
    if a in floats and b in floats:
        if tf.bfloat16 in (a, b):
            other = b if a == tf.bfloat16 else a
            return float32 if other == tf.float16 else other
        return _FLOATS[builtins.max(_FLOATS.index(a), _FLOATS.index(b))]
    for family in (_SIGNED, _UNSIGNED):
        if a in family and b in family:
            return family[builtins.max(family.index(a), family.index(b))]
    if a in _SIGNED and b in _UNSIGNED or a in _UNSIGNED and b in _SIGNED:
        signed, unsigned = (a, b) if a in _SIGNED else (b, a)
        wider = _SIGNED[builtins.min(_UNSIGNED.index(unsigned) + 1, len(_SIGNED) - 1)]
        return _promote(signed, wider)
    raise TypeError(f"no promotion between {a.name} and {b.name} in this namespace")


class finfo_object(NamedTuple):
    bits: int
    eps: float
    max: float
    min: float
    smallest_normal: float
    dtype: tf.DType


def finfo(type: Any, /) -> finfo_object:
    dtype = type.dtype if isinstance(type, Array) else type
    import ml_dtypes  # TensorFlow's own dependency: knows bfloat16 too

    info = ml_dtypes.finfo(dtype.as_numpy_dtype)
    return finfo_object(int(info.bits), float(info.eps), float(info.max), float(info.min),
                        float(info.smallest_normal), dtype)


class iinfo_object(NamedTuple):
    bits: int
    max: int
    min: int
    dtype: tf.DType


def iinfo(type: Any, /) -> iinfo_object:
    dtype = type.dtype if isinstance(type, Array) else type
    return iinfo_object(dtype.size * 8, int(dtype.max), int(dtype.min), dtype)


# --- inspection ------------------------------------------------------------------------------

class _Info:
    """``__array_namespace_info__()``: TensorFlow's logical devices and the dtypes here."""

    def capabilities(self) -> dict:
        return {"boolean indexing": False, "data-dependent shapes": False}

    def default_device(self) -> str:
        return self.devices()[0]

    def devices(self) -> list[str]:
        return [_short_device(d.name) for d in tf.config.list_logical_devices()]

    def default_dtypes(self, *, device: Any = None) -> dict:
        return {"real floating": float32, "integral": int64, "indexing": int64}

    def dtypes(self, *, device: Any = None, kind: Any = None) -> dict:
        every = {"bool": bool, "int32": int32, "int64": int64, "float16": float16,
                 "bfloat16": bfloat16, "float32": float32, "float64": float64}
        return {name: d for name, d in every.items() if kind is None or isdtype(d, kind)}


def __array_namespace_info__() -> _Info:
    return _Info()


float16, bfloat16, float32, float64 = tf.float16, tf.bfloat16, tf.float32, tf.float64
int32, int64, bool = tf.int32, tf.int64, tf.bool  # noqa: A001 (the standard's names)
