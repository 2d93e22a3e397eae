"""Any Array-API namespace, named by its module (``mvn-core check --namespace some.module``).

The other backend modules know their library; this one knows only the standard, so
that a user's own array library can be checked without writing a backend for it.
:func:`from_module` returns an object with the functions every backend module has
(see :mod:`mvn_core.backends`), for the namespace's default device:

- arrays are made with ``xp.asarray(numpy_array, dtype=xp.<dtype>)``;
- they come back through DLPack (``numpy.from_dlpack(x, device="cpu")``, the
  standard's way to the host), else ``numpy.asarray``; a dtype NumPy lacks (bfloat16)
  is first cast to float32, which holds it exactly;
- the dtypes are those ``__array_namespace_info__().dtypes(kind="real floating")``
  lists, or, for a namespace without it, its ``float32``/``float64`` attributes;
- there is no compile hook, and nothing to synchronize.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STANDARD_DTYPES = ("float32", "float64")
NUMPY_DTYPES = ("float16", "float32", "float64")


class NamespaceBackend:
    """The backend functions for the namespace imported as ``module_name``."""

    def __init__(self, module_name: str):
        self.NAME = module_name

    def unavailable_reason(self) -> str | None:
        try:
            self.namespace()
        except Exception as error:  # not installed, or broken: reported, not raised
            return f"{self.NAME} cannot be imported: {error}"
        if not hasattr(self.namespace(), "asarray"):
            return f"{self.NAME} is not an Array-API namespace (it has no asarray)"
        return None

    def namespace(self) -> ModuleType:
        return importlib.import_module(self.NAME)

    def _info(self):
        info = getattr(self.namespace(), "__array_namespace_info__", None)
        return None if info is None else info()

    def devices(self) -> list:
        return [self.default_device()]

    def default_device(self):
        info = self._info()
        return None if info is None else info.default_device()

    def from_numpy(self, array, device=None, dtype=None):
        xp = self.namespace()
        dtype = getattr(xp, dtype) if isinstance(dtype, str) else dtype
        where = {} if device is None else {"device": device}
        return xp.asarray(array, dtype=dtype, **where)

    def to_numpy(self, x):
        import numpy as np

        xp = self.namespace()
        if not any(x.dtype == getattr(xp, name, None) for name in NUMPY_DTYPES):
            x = xp.astype(x, xp.float32)
        try:
            return np.from_dlpack(x, device="cpu")
        except Exception:  # no DLPack, or an older protocol: the buffer itself
            return np.asarray(x)

    def dtypes(self, device=None) -> dict:
        info = self._info()
        if info is not None:
            return dict(info.dtypes(device=device or self.default_device(),
                                    kind="real floating"))
        xp = self.namespace()
        return {name: getattr(xp, name) for name in STANDARD_DTYPES if hasattr(xp, name)}

    def compile(self, fn):
        return fn

    def synchronize(self, x=None):
        return x

    def __repr__(self) -> str:
        return f"NamespaceBackend({self.NAME!r})"


def from_module(module_name: str) -> NamespaceBackend:
    """The backend of the Array-API namespace importable as ``module_name``."""
    return NamespaceBackend(module_name)
