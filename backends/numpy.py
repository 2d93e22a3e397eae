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
