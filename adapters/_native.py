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

The same cache holds C++ helpers built against another library's headers
(:func:`library` with ``cxx=True``: the torch replay's :mod:`._torch_gather`); their key
also covers that library's version.
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
# C++ helpers are glue against a library's headers (no arithmetic of a rule): warnings
# from those headers are not ours to read.
CXX_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-w")
_LOCK = threading.Lock()
_LOCKS: dict[str, threading.Lock] = {}


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
    found = _first_working((os.environ.get("CC"), "cc", "gcc", "clang"), FLAGS,
                           (OPENMP, ALIAS_CHECKS), ".c")
    if found is None:
        raise KernelUnavailable("no working C compiler was found (set CC, or install gcc or clang)")
    return found


@functools.cache
def cxx_compiler() -> tuple[str, tuple[str, ...], str]:
    """The C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``), its flags and
    its identity, as :func:`compiler`, or :class:`KernelUnavailable`."""
    found = _first_working((os.environ.get("CXX"), "c++", "g++", "clang++"), CXX_FLAGS, (),
                           ".cpp")
    if found is None:
        raise KernelUnavailable("no working C++ compiler was found (set CXX, or install g++ "
                                "or clang++)")
    return found


def _first_working(names, flags: tuple[str, ...], options: tuple[str, ...], suffix: str
                   ) -> tuple[str, tuple[str, ...], str] | None:
    """The first of ``names`` that compiles with ``flags``, with each of ``options`` it
    takes, and its version line; None if none does."""
    for name in filter(None, names):
        path = shutil.which(name)
        if path is None:
            continue
        try:
            version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            continue
        taken = flags + tuple(o for o in options if _compiles(path, flags + (o,), suffix))
        if _compiles(path, taken, suffix):
            return path, taken, version
    return None


def _compiles(path: str, flags: tuple[str, ...], suffix: str = ".c") -> bool:
    probe = "int mvn_probe(int x) { return x + 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        source, out = os.path.join(tmp, "probe" + suffix), os.path.join(tmp, "probe.so")
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


def library(source: str, include_dirs: tuple[str, ...] = (), *, cxx: bool = False,
            link: tuple[str, ...] = (), identity: str = "") -> ctypes.CDLL:
    """The compiled shared library of ``source`` (with the headers of ``include_dirs``),
    from the cache or compiled now.  ``cxx``: the source is C++ (:func:`cxx_compiler`);
    ``link``: the linker's arguments (libraries); ``identity``: what else the library
    depends on (another library's version), part of the cache's key."""
    path, flags, version = cxx_compiler() if cxx else compiler()
    flags += tuple(f"-I{folder}" for folder in include_dirs)
    libraries = tuple(link) + LIBRARIES
    key = hashlib.sha256("\0".join((source, path, version, *flags, *libraries, identity,
                                     _machine())).encode())
    suffix = ".cpp" if cxx else ".c"
    return _load(str(_built(source, key.hexdigest()[:32], path, flags, libraries, suffix)))


@functools.cache
def _load(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path)


def _built(source: str, key: str, path: str, flags: tuple[str, ...],
           libraries: tuple[str, ...] = LIBRARIES, suffix: str = ".c") -> Path:
    folder = cache_dir()
    target = folder / f"{key}.so"
    if target.exists():
        return target
    with _lock(key):
        if target.exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            c_file, so_file = Path(tmp) / f"{key}{suffix}", Path(tmp) / f"{key}.so"
            c_file.write_text(source)
            run = subprocess.run([path, *flags, "-o", str(so_file), str(c_file), *libraries],
                                 capture_output=True, text=True, timeout=600)
            if run.returncode != 0:
                raise KernelUnavailable(f"the compiler {path} failed on a generated source: "
                                        f"{run.stderr.strip()[:2000]}")
            os.replace(so_file, target)
            (folder / f"{key}{suffix}").write_text(source)  # to read what runs; not needed to run
    return target


def _lock(key: str) -> threading.Lock:
    """One lock per library: a build in one thread does not hold up another's."""
    with _LOCK:
        return _LOCKS.setdefault(key, threading.Lock())


KERNEL_ARGTYPES = (ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32)


def function(source: str, name: str):
    """The kernel ``name`` of ``source`` as a ctypes function (see :mod:`._c_source`)."""
    fn = getattr(library(source), name)
    fn.argtypes = KERNEL_ARGTYPES
    fn.restype = None
    return fn
