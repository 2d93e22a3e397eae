"""One small module per array library, all with the same functions.

Each backend module offers:

- ``NAME`` and ``unavailable_reason()`` (None when the library can be used here);
- ``namespace()``: the Array-API namespace; ``devices()`` and ``default_device()``;
- ``from_numpy(array, device=None, dtype=None)`` and ``to_numpy(x)``;
- ``dtypes(device=None)``: the floating dtypes it supports there, by name;
- ``compile(fn)``: its compiler (``jax.jit``, ``torch.compile``) or ``fn`` itself;
  where that compiler needs more than the library, ``compile_unavailable_reason(device)``
  says why it cannot run there (torch's on a CPU needs a C++ compiler), else None;
- ``synchronize(x=None)``: wait for queued device work (for timing).

:mod:`.generic` makes the same functions for any Array-API namespace named by its
module, for checking a library that has no module here.

Importing this package imports no array library; a backend's library is imported the
first time one of its functions needs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The libraries with a namespace of the whole standard: the conformance matrix, the demo
# and the tests run every one of them that is installed.
NAMES = ("numpy", "array_api_strict", "torch", "jax", "cupy")
# Libraries whose namespace here implements only what the rules use (TensorFlow's, see
# :mod:`.tensorflow_namespace`): :func:`get` knows them, ``mvn-core check --namespace``
# checks them, the matrix leaves them out.
PARTIAL = ("tensorflow",)


def get(name):
    """The backend module called ``name`` (one of :data:`NAMES` or :data:`PARTIAL`); a
    backend object (such as :func:`.generic.from_module` returns) is returned as it is."""
    if not isinstance(name, str):
        return name
    if name not in NAMES + PARTIAL:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(NAMES + PARTIAL)}")
    return importlib.import_module(f"{__name__}.{name}")


def status() -> dict[str, str | None]:
    """Each backend's ``unavailable_reason()``: None where it can be used."""
    return {name: get(name).unavailable_reason() for name in NAMES}


def available() -> list[str]:
    """The names of the backends that can be used here."""
    return [name for name, reason in status().items() if reason is None]
