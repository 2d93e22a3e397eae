"""NumPy: CPU only, through array-api-compat's NumPy namespace."""

from __future__ import annotations

from ._common import missing, pick_dtypes

NAME = "numpy"


def unavailable_reason():
    return missing("numpy", "numpy")


def namespace():
    import array_api_compat.numpy as xp

    return xp


def devices():
    return ["cpu"]


def default_device():
    return "cpu"


def from_numpy(array, device=None, dtype=None):
    import numpy as np

    return np.array(array, dtype=dtype or array.dtype, copy=True)


def to_numpy(x):
    import numpy as np

    return np.asarray(x)


def dtypes(device=None):
    import numpy as np

    return pick_dtypes(np, ("float16", "float32", "float64"))


def compile(fn):
    return fn


def synchronize(x=None):
    return x


def round_to(values, dtype):
    """``values`` rounded to the nearest numbers of ``dtype`` (a name), to nearest and
    ties to even, as a NumPy array.  NumPy has no bfloat16: its values are kept in
    float32, with 8 significant bits (NaN stays NaN)."""
    import numpy as np

    if dtype != "bfloat16":
        return np.asarray(values).astype(dtype)
    values = np.asarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    nearest_even = ((bits >> 16) & 1) + 0x7FFF
    rounded = ((bits + nearest_even) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(values), np.float32(np.nan), rounded)
