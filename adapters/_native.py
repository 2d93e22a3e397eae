"""Generated C kernels for the CPU: compiled at first use by the system's C compiler,
cached on disk by a hash of their source, loaded and called through ctypes.

A kernel is compiled with ``-O3 -march=native -fopenmp`` and without fast math or
floating-point contraction (``-ffp-contract=off``: ``a * b + c`` is not fused into
one rounding), so each operation rounds as it does alone and the results are the pure
rule's bit for bit.  ``-fno-math-errno`` only stops ``sqrt`` from setting ``errno``,
which lets it vectorize; ``-fno-trapping-math`` lets the compiler compute both sides
of a ``where`` (a select, as Lion's sign and MaxVA's clamps are), which it otherwise
refuses to speculate in case one raises a floating-point trap: the loop then
vectorizes (Lion's step ran six times faster).  Neither changes a value; no option that
does (reassociation, reciprocals, flushing subnormals, finite-math assumptions) is
given.

The cache is ``$MVN_CORE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/mvn-core`` or
``~/.cache/mvn-core``), subfolder ``kernels``.  The hash covers the source, the
compiler and its flags, and the processor (``-march=native`` code is not portable), so
a warm start compiles nothing and a changed rule compiles anew.  A compiled library is
written under a temporary name and renamed into place, so processes sharing the cache
never load a half-written file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

# -fno-fast-math would come first if given: it resets -fno-math-errno (no fast math is
# the default anyway).
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
         "-std=c11", "-fPIC", "-shared")
LIBRARIES = ("-lm",)
OPENMP = "-fopenmp"
# GCC vectorizes a loop whose arrays may overlap by checking at run time that they do
# not, and gives up above 10 such checks: a rule with four state buffers (MaxVA) needs
# 15.  A tuning option, taken where the compiler knows it.
ALIAS_CHECKS = "--param=vect-max-version-for-alias-checks=64"
_LOCK = threading.Lock()


class KernelUnavailable(RuntimeError):
    """No kernel can be built here (no C compiler, or it failed); says why."""


def cache_dir() -> Path:
    root = os.environ.get("MVN_CORE_CACHE_DIR")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "mvn-core")
    return Path(root) / "kernels"


@functools.cache
def compiler() -> tuple[str, tuple[str, ...], str]:
    """The C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``), its flags (with
    OpenMP where it has it) and its identity (its version line), or
    :class:`KernelUnavailable`."""
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(name)
        if path is None:
            continue
        try:
            version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            continue
        flags = FLAGS + tuple(option for option in (OPENMP, ALIAS_CHECKS)
                              if _compiles(path, FLAGS + (option,)))
        if not _compiles(path, flags):
            continue
        return path, flags, version
    raise KernelUnavailable("no working C compiler was found (set CC, or install gcc or clang)")


def _compiles(path: str, flags: tuple[str, ...]) -> bool:
    probe = "int mvn_probe(int x) { return x + 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        source, out = os.path.join(tmp, "probe.c"), os.path.join(tmp, "probe.so")
        Path(source).write_text(probe)
        run = subprocess.run([path, *flags, "-o", out, source, *LIBRARIES], capture_output=True,
                             timeout=120)
        return run.returncode == 0


@functools.cache
def _machine() -> str:
    """What ``-march=native`` depends on: the architecture and the processor's features."""
    features = ""
    try:
        with open("/proc/cpuinfo") as info:
            features = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {features.strip()}"


def library(source: str, include_dirs: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled shared library of ``source`` (with the headers of ``include_dirs``),
    from the cache or compiled now."""
    path, flags, version = compiler()
    flags += tuple(f"-I{folder}" for folder in include_dirs)
    key = hashlib.sha256("\0".join((source, path, version, *flags, _machine())).encode())
    return _load(str(_built(source, key.hexdigest()[:32], path, flags)))


@functools.cache
def _load(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path)


def _built(source: str, key: str, path: str, flags: tuple[str, ...]) -> Path:
    folder = cache_dir()
    target = folder / f"{key}.so"
    if target.exists():
        return target
    with _LOCK:
        if target.exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            c_file, so_file = Path(tmp) / f"{key}.c", Path(tmp) / f"{key}.so"
            c_file.write_text(source)
            run = subprocess.run([path, *flags, "-o", str(so_file), str(c_file), *LIBRARIES],
                                 capture_output=True, text=True, timeout=600)
            if run.returncode != 0:
                raise KernelUnavailable(f"the C compiler {path} failed on a generated kernel: "
                                        f"{run.stderr.strip()[:2000]}")
            os.replace(so_file, target)
            (folder / f"{key}.c").write_text(source)  # to read what runs; not needed to run
    return target


KERNEL_ARGTYPES = (ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32)


def function(source: str, name: str):
    """The kernel ``name`` of ``source`` as a ctypes function (see :mod:`._c_source`)."""
    fn = getattr(library(source), name)
    fn.argtypes = KERNEL_ARGTYPES
    fn.restype = None
    return fn
