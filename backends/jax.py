"""JAX: its default devices (CPU, GPU); compile hook ``jax.jit``.  float64 exists only
when ``jax_enable_x64`` is on."""

from __future__ import annotations

from ._common import missing, pick_dtypes

NAME = "jax"


def unavailable_reason():
    return missing("jax", "jax")


def namespace():
    import jax.numpy as jnp

    return jnp


def devices():
    """CPU devices first, then the accelerators of the default platform, if any."""
    import jax

    accelerators = [d for d in jax.devices() if d.platform != "cpu"]
    return [*jax.devices("cpu"), *accelerators]


def default_device():
    import jax

    return jax.devices()[0]


def from_numpy(array, device=None, dtype=None):
    import jax

    dtype = getattr(namespace(), dtype) if isinstance(dtype, str) else dtype
    return jax.device_put(namespace().asarray(array, dtype=dtype), device or default_device())


def to_numpy(x):
    import numpy as np

    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.name == "bfloat16" else x


def dtypes(device=None):
    import jax

    found = pick_dtypes(namespace(), ("float16", "bfloat16", "float32", "float64"))
    if not jax.config.jax_enable_x64:
        found.pop("float64")
    return found


def enable_x64():
    """Turn on float64 (``jax_enable_x64``), a process-wide switch; arrays made with an
    explicit float32 dtype stay float32."""
    import jax

    jax.config.update("jax_enable_x64", True)


def compile(fn):
    import jax

    return jax.jit(fn)


def synchronize(x=None):
    import jax

    return jax.block_until_ready(x)
