"""array-api-strict: the standard and nothing more, with several simulated devices
(one of which has no float64).  The hostile reference for the core's portability."""

from __future__ import annotations

from ._common import missing

NAME = "array_api_strict"


def unavailable_reason():
    return missing("array_api_strict", "test")


def namespace():
    import array_api_strict as xp

    return xp


def devices():
    return list(namespace().__array_namespace_info__().devices())


def default_device():
    return namespace().__array_namespace_info__().default_device()


def from_numpy(array, device=None, dtype=None):
    xp = namespace()
    dtype = getattr(xp, dtype) if isinstance(dtype, str) else dtype
    return xp.asarray(array, dtype=dtype, device=device or default_device(), copy=True)


def to_numpy(x):
    import numpy as np

    # Only the CPU device converts; the simulated devices hold the same memory.
    return np.asarray(x.to_device(namespace().Device("CPU_DEVICE")))


def dtypes(device=None):
    info = namespace().__array_namespace_info__()
    return dict(info.dtypes(device=device or default_device(), kind="real floating"))


def compile(fn):
    return fn


def synchronize(x=None):
    return x
