"""The replayed step's per-tensor reads in C++: each gradient's address, and the checks
that the tensors are still as the replay was prepared.

In Python these are some attribute reads and method calls per tensor (``p.grad``, its
``data_ptr()``, dtype, size and contiguity, the parameter's address: about 2 µs a
tensor, 20 ms a step at 10,000 tensors, several times the arithmetic).  Here they are
reads of torch's C++ tensors, about 0.15 µs a tensor.  The parameters are reached
through their ``TensorImpl`` pointers (``Tensor._cdata``), which the replay compares
with the parameters' own at every step: ``torch.utils.swap_tensors`` exchanges them.

The helper is compiled by the system's C++ compiler against the installed torch's
headers (about 3 s), once per machine and torch version (the kernels' disk cache), in
a background thread started by the first replay of a group of :data:`MANY` tensors or
more; once loaded, every group's replay uses it.  Until then, and where it cannot be
built (no C++ compiler, a torch without its headers: said once in a warning when a
group of :data:`MANY` tensors or more replays), the replay reads the tensors in Python.  Both make the same checks and read the same
addresses (a parameter's through ``mutable_data()``, as ``data_ptr()`` does), so the
steps are the same.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from typing import NamedTuple

import torch

from . import _native

MANY = 100  # tensors in a group from which the helper is worth building

SOURCE = r"""
#define _GLIBCXX_USE_CXX11_ABI %(abi)d
#include <ATen/core/TensorBase.h>
#include <c10/core/ScalarTypeToTypeMeta.h>
#include <c10/core/TensorImpl.h>
#include <cstdint>

using c10::TensorImpl;

// TensorImpl::grad() returns an at::Tensor, which adds only methods to TensorBase.
static const at::TensorBase &grad_of(const TensorImpl *param) {
  return reinterpret_cast<const at::TensorBase &>(param->grad());
}

static int8_t type_code(const TensorImpl *tensor) {
  return static_cast<int8_t>(c10::typeMetaToScalarType(tensor->dtype()));
}

// The dtype code of each parameter's gradient (-1: none), or -1 on an error.
extern "C" int64_t mvn_grad_types(int64_t n, const int64_t *params, int8_t *types) {
  try {
    for (int64_t i = 0; i < n; ++i) {
      const at::TensorBase &grad = grad_of(reinterpret_cast<const TensorImpl *>(params[i]));
      types[i] = grad.defined() ? type_code(grad.unsafeGetTensorImpl()) : -1;
    }
    return n;
  } catch (...) {
    return -1;
  }
}

// For each of n parameters: that its data are still at table[i] with numel[i] elements,
// and that its gradient is a dense, contiguous CPU tensor of as many elements and of
// dtype types[i]; then its gradient's address into table[n + i].  Returns n, else the
// first parameter that differs (its own step names the difference).
extern "C" int64_t mvn_gather_grads(int64_t n, const int64_t *params, const int64_t *numel,
                                    const int8_t *types, int64_t *table) {
  int64_t i = 0;
  try {
    for (; i < n; ++i) {
      const TensorImpl *param = reinterpret_cast<const TensorImpl *>(params[i]);
      // mutable_data(), as Python's data_ptr(): a copy-on-write storage is separated
      // here (and found at another address), never written through.
      if (!param->has_storage() || param->numel() != numel[i]
          || reinterpret_cast<int64_t>(const_cast<TensorImpl *>(param)->mutable_data()) != table[i])
        return i;
      const at::TensorBase &grad = grad_of(param);
      if (!grad.defined())
        return i;
      const TensorImpl *g = grad.unsafeGetTensorImpl();
      if (g->layout() != c10::kStrided || g->device_type() != c10::DeviceType::CPU
          || type_code(g) != types[i] || g->numel() != numel[i] || !g->has_storage()
          || !g->is_contiguous())
        return i;
      table[n + i] = reinterpret_cast<int64_t>(g->data());
    }
    return n;
  } catch (...) {
    return i;
  }
}
"""


class Helper(NamedTuple):
    """The compiled functions (see :data:`SOURCE`)."""

    grad_types: ctypes._CFuncPtr
    gather_grads: ctypes._CFuncPtr


def _build() -> Helper:
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    libraries = os.path.join(os.path.dirname(torch.__file__), "lib")
    if not os.path.isdir(os.path.join(include, "c10")):
        raise _native.KernelUnavailable(f"this torch has no C++ headers (looked in {include})")
    source = SOURCE % {"abi": int(torch._C._GLIBCXX_USE_CXX11_ABI)}
    library = _native.library(
        source, (include,), cxx=True,
        link=(f"-L{libraries}", "-lc10", f"-Wl,-rpath,{libraries}"),
        identity=f"torch {torch.__version__} {torch.version.git_version}")
    # Called holding the GIL (a PyDLL): no other Python thread changes a gradient
    # while it is read.
    library = ctypes.PyDLL(library._name)
    pointer = ctypes.c_void_p
    library.mvn_grad_types.argtypes = (ctypes.c_int64, pointer, pointer)
    library.mvn_gather_grads.argtypes = (ctypes.c_int64, pointer, pointer, pointer, pointer)
    library.mvn_grad_types.restype = library.mvn_gather_grads.restype = ctypes.c_int64
    return Helper(library.mvn_grad_types, library.mvn_gather_grads)


class _Builder:
    """Builds the helper once, in a background thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._result: Helper | Exception | None = None
        self._told = False

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="mvn-core torch helper")
                self._thread.start()

    def _run(self) -> None:
        try:
            self._result = _build()
        except FileNotFoundError:  # a temporary cache folder gone meanwhile: the next start retries
            with self._lock:
                self._thread = None
        except Exception as error:  # said in the caller's thread: see helper()
            self._result = error

    def loaded(self) -> Helper | None:
        """The helper if it is loaded, else None; says nothing."""
        result = self._result
        return result if isinstance(result, Helper) else None

    def wait_if_started(self) -> None:
        """Wait for a build that has started to end."""
        thread = self._thread
        if thread is not None:
            thread.join()

    def helper(self, wait: bool = False, many: bool = False) -> Helper | None:
        """The helper if it is loaded (``wait``: once its build has ended), else None.
        ``many``: asked for a group of :data:`MANY` tensors or more, where reading in
        Python costs: a failed build is said then, once."""
        if wait:
            self.start()
            self.wait_if_started()
        result = self._result
        if isinstance(result, Exception) and many and not self._told:
            self._told = True
            warnings.warn(f"mvn-core reads a replayed step's tensors in Python (about 2 µs a "
                          f"tensor) instead of its C++ helper: {result}", RuntimeWarning,
                          stacklevel=3)
        return result if isinstance(result, Helper) else None

    def unavailable_reason(self) -> str | None:
        """Why the helper is not loaded (its build's error, or that it is still being
        built), or None."""
        result = self._result
        if isinstance(result, Exception):
            return str(result)
        return None if isinstance(result, Helper) else "its build has not ended"


_builder = _Builder()
start = _builder.start
helper = _builder.helper
loaded = _builder.loaded
wait_if_started = _builder.wait_if_started
unavailable_reason = _builder.unavailable_reason
