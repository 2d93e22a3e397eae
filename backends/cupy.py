"""CuPy: NVIDIA (or ROCm) GPUs only; reported unavailable where no GPU is present."""

from __future__ import annotations

from ._common import missing, pick_dtypes

NAME = "cupy"


def unavailable_reason():
    reason = missing("cupy", "cupy")
    if reason is not None:
        return reason
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, no device
        return f"cupy finds no GPU: {error}"
    return None if count > 0 else "cupy finds no GPU"


def namespace():
    import array_api_compat.cupy as xp

    return xp


def devices():
    import cupy

    return [cupy.cuda.Device(i) for i in range(cupy.cuda.runtime.getDeviceCount())]


def default_device():
    import cupy

    return cupy.cuda.Device()


def from_numpy(array, device=None, dtype=None):
    import cupy

    with device or default_device():
        return cupy.array(array, dtype=dtype or array.dtype)


def to_numpy(x):
    return x.get()


def dtypes(device=None):
    import cupy

    return pick_dtypes(cupy, ("float16", "float32", "float64"))


def compile(fn):
    return fn


def synchronize(x=None):
    import cupy

    cupy.cuda.Device().synchronize()
    return x
