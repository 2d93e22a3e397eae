"""PyTorch: CPU and CUDA devices; compile hook ``torch.compile``."""

from __future__ import annotations

import os
import shutil

from ._common import missing, pick_dtypes

NAME = "torch"


def unavailable_reason():
    return missing("torch", "torch")


def _torch():
    import torch

    return torch


def namespace():
    import array_api_compat.torch as xp

    return xp


def devices():
    torch = _torch()
    cuda = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu"), *cuda]


def default_device():
    return _torch().device("cpu")


def from_numpy(array, device=None, dtype=None):
    torch = _torch()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.tensor(array, dtype=dtype, device=device or "cpu")


def to_numpy(x):
    torch = _torch()
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
        x = x.float()
    return x.numpy()


def dtypes(device=None):
    torch = _torch()
    found = pick_dtypes(torch, ("float16", "bfloat16", "float32", "float64"))
    if device is not None and torch.device(device).type == "mps":
        found.pop("float64")
    return found


def compile(fn):
    return _torch().compile(fn)


def compile_unavailable_reason(device=None) -> str | None:
    """Why :func:`compile` cannot run on ``device`` here, or None: on a CPU its backend
    (inductor) builds C++, and needs a C++ compiler."""
    if device is not None and _torch().device(device).type != "cpu":
        return None
    compilers = filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++"))
    if any(shutil.which(name) for name in compilers):
        return None
    return "torch.compile on a CPU needs a C++ compiler (g++ or clang++), and none is installed"


def synchronize(x=None):
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x
