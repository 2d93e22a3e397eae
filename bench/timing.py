"""The vocabulary of ``mvn-core bench``: what a backend offers it, and how a case is timed.

A backend's bench module (:mod:`.for_torch`, :mod:`.for_jax`, :mod:`.for_arrays`)
makes a :class:`Workload` (N float32 parameters in K tensors, their fixed gradients, a
memory probe, a copy of N floats) and lists its cases (:class:`BenchCase`): our rules on each
of its execution paths, and the peers.  :func:`measure` times a case the same way
everywhere: the first step on its own (it builds the state and, on a compiled path,
compiles), then warm-up steps, then the timed steps, each one waited for (device work
included), with memory read before, after the first step, at the end of the warm-up
and after the timed steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

OURS = "mvn-core"
SLOW_SHARE = 4  # the reference path runs a quarter of the steps (and of the warm-up)
LR = 1e-3


def hyperparameters(rule_name: str) -> dict:
    """What every case of ``rule_name`` runs with, ours and the peers alike: the rule's
    defaults and its first checked setting without weight decay (SGD's momentum 0.9:
    its default of 0 keeps no state at all)."""
    import mvn_core

    return {**mvn_core.rules[rule_name].defaults, "lr": LR,
            **_first_setting(mvn_core.rules[rule_name])}


def _first_setting(rule) -> dict:
    setting = dict(rule.settings[0]) if rule.settings else {}
    setting.pop("weight_decay", None)
    return setting


class Stepper(NamedTuple):
    """One running optimizer: ``step()`` makes a step and waits for it to finish;
    ``state_bytes()`` is the size of its state; ``close()`` hands the parameters back
    to the workload (JAX steps return new ones); ``temporary_bytes()``, where given,
    is the compiler's account of a step's temporaries, used instead of the memory
    probe's; ``settle()`` waits for work that the first step started in the
    background (a helper's build), so that the timed steps are the steady state."""

    step: Callable[[], None]
    state_bytes: Callable[[], int]
    close: Callable[[], None] = lambda: None
    temporary_bytes: Callable[[], int | None] | None = None
    settle: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class BenchCase:
    """One row of the benchmark: ``rule`` run by ``implementation`` on ``path``.

    ``make(workload)`` builds the optimizer (its state may be created lazily, at the
    first step) and returns a :class:`Stepper`.  ``requires`` names the modules a peer
    needs; ``baseline`` marks the peer the backend's rows are compared with; ``slow``
    gets fewer steps (the reference path); ``compiled`` says that the first step
    compiles.
    """

    backend: str
    rule: str
    implementation: str
    path: str
    make: Callable[[Any], Stepper] = field(repr=False, compare=False)
    requires: tuple = ()
    baseline: bool = False
    slow: bool = False
    compiled: bool = False

    @property
    def ours(self) -> bool:
        return self.implementation == OURS


class MemoryProbe:
    """Memory of the process, from ``/proc/self`` (Linux): the resident set (RSS) now
    and its high-water mark (``VmHWM``), which writing ``5`` to ``/proc/self/clear_refs``
    resets.  Before each reading, freed heap memory is handed back to the system
    (glibc's ``malloc_trim``), so that a case's peak is not hidden by memory that an
    earlier case freed but the allocator kept.  Elsewhere every reading is None.
    """

    source = "process RSS (/proc/self)"

    def current(self) -> int | None:
        _malloc_trim()
        return _proc_status_bytes("VmRSS")

    def reset_peak(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak(self) -> int | None:
        return _proc_status_bytes("VmHWM")


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    trim = _malloc_trim_function()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim_function():
    """glibc's ``malloc_trim``, None with another C library."""
    name = ctypes.util.find_library("c")
    return None if name is None else getattr(ctypes.CDLL(name), "malloc_trim", None)


@dataclass
class Workload:
    """N float32 parameters in K tensors on one device, with fixed gradients.

    Every case of a backend steps the same parameters (each with a fresh optimizer
    state); the gradients never change, so the work per step does not either.
    ``make_copy()`` allocates two buffers of N floats and returns a function that
    copies one into the other (read and write, waited for): the copy bandwidth,
    measured in the same run.
    """

    backend: str
    device: Any
    device_label: str
    params: list
    grads: list
    memory: Any  # a MemoryProbe, or one of a device library with the same methods
    make_copy: Callable[[], Callable[[], None]]
    description: str = ""  # the device's name, where the library tells it

    @property
    def n(self) -> int:
        return sum(self.sizes)

    @property
    def k(self) -> int:
        return len(self.params)

    @property
    def sizes(self) -> list[int]:
        return [_numel(p) for p in self.params]


def _numel(x) -> int:
    size = x.size
    return size if isinstance(size, int) else x.numel()  # torch's .size is a method


# Relative sizes of the tensors of one "layer" (a golden-ratio spread over [1/2, 2)).
LAYER = tuple(2.0 ** (2.0 * ((i * 0.6180339887) % 1.0) - 1.0) for i in range(7))


def split_sizes(n: int, k: int) -> list[int]:
    """``n`` elements in ``k`` tensors whose sizes cycle through :data:`LAYER` (from
    about half to twice the mean), as a model's layers repeat a few shapes.

    Tensors of one size would flatter the compiled paths: ``torch.compile`` gives
    equal sizes one symbol (duck sizing) and fuses their loops into one.  Sizes all
    different would not be a model either, and slow XLA's compilation down.  What
    flooring leaves over goes, one each, to the first tensors.
    """
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} parameters into {k} non-empty tensors")
    weights = [LAYER[i % len(LAYER)] for i in range(k)]
    total = sum(weights)
    sizes = [max(1, int(n * w / total)) for w in weights]
    left = n - sum(sizes)  # fewer than k lost to flooring; negative if max(1) added some
    if left >= 0:
        return [size + (i < left) for i, size in enumerate(sizes)]
    sizes[max(range(k), key=sizes.__getitem__)] += left
    return sizes


@dataclass
class Measurement:
    """A case's figures.  Times in milliseconds; memory in bytes, None where the
    probe has no reading.

    ``peak_bytes``: the most memory held during the steps after the first, beyond what
    was held before the optimizer was made: its state, its temporaries at their
    largest, and what its first step loaded for good (libraries, compiled code).  The
    first step itself is left out: a compiler's working memory is not the optimizer's.
    ``temporary_bytes``: the same peak beyond what was held after the first step (the
    state is already there): the temporaries alone.  ``growth_bytes``: the memory
    gained over ``growth_steps`` steps, from the end of the warm-up to a few steps
    after the timed ones (zero unless something leaks)."""

    ms_per_step: float
    first_step_ms: float
    repeats: int
    state_bytes: int
    peak_bytes: int | None
    temporary_bytes: int | None
    growth_bytes: int | None
    growth_steps: int


SETTLE = 3  # steps whose least memory reading marks each end of the growth window


def measure(case: BenchCase, workload: Workload, warmup: int, repeat: int) -> Measurement:
    """Time ``case`` on ``workload``: the median of ``repeat`` steps after ``warmup``
    steps (at least ``1 + SETTLE``; the first is reported on its own: set-up and
    compilation).  Memory grows from the last warm-up steps to ``SETTLE`` steps after
    the timed ones."""
    probe = workload.memory
    gc.collect()  # the earlier cases' garbage; later only the young generations: cheaper
    before = probe.current()
    started = time.perf_counter()
    stepper = case.make(workload)
    try:
        stepper.step()
        first = time.perf_counter() - started
        stepper.settle()
        after_first = _reading(probe)
        probe.reset_peak()
        for _ in range(warmup - 1 - SETTLE):
            stepper.step()
        settled = _least_reading(probe, stepper.step)
        times = [_timed(stepper.step) for _ in range(repeat)]
        end = _least_reading(probe, stepper.step)
        peak = probe.peak()
        state = stepper.state_bytes()
        temporary = (stepper.temporary_bytes() if stepper.temporary_bytes
                     else _difference(peak, after_first))
    finally:
        stepper.close()
    return Measurement(
        ms_per_step=1e3 * statistics.median(times), first_step_ms=1e3 * first, repeats=repeat,
        state_bytes=state, peak_bytes=_difference(peak, before), temporary_bytes=temporary,
        growth_bytes=_difference(end, settled), growth_steps=repeat + SETTLE)


def _reading(probe) -> int | None:
    gc.collect(1)
    return probe.current()


def _least_reading(probe, step: Callable[[], None]) -> int | None:
    """The least of the readings after each of ``SETTLE`` more steps: a buffer that a
    reading catches alive between two steps (a temporary, a donated buffer freed
    late) is not growth; a leak raises every reading."""
    readings = []
    for _ in range(SETTLE):
        step()
        readings.append(_reading(probe))
    return None if None in readings else min(readings)


def _timed(step: Callable[[], None]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def copy_ms(workload: Workload, repeat: int) -> float:
    """The median time of one copy of N floats (after one untimed copy); the buffers
    are freed before the cases run."""
    return _median_copy_ms(workload.make_copy(), repeat)


def _median_copy_ms(copy: Callable[[], None], repeat: int) -> float:
    """The median time of ``copy()`` in ms, over ``repeat`` (at least 3) calls after an
    untimed one."""
    copy()
    return 1e3 * statistics.median([_timed(copy) for _ in range(max(repeat, 3))])


_COPY_LOOP = r"""
#include <stdint.h>
void mvn_copy(int64_t n, const float *restrict in, float *restrict out, int64_t chunk,
              int32_t threads)
{
    const int64_t chunks = (n + chunk - 1) / chunk;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t start = c * chunk, end = start + chunk < n ? start + chunk : n;
        for (int64_t i = start; i < end; ++i)
            out[i] = in[i];
    }
}
"""


def c_copy_ms(n: int, repeat: int) -> float | None:
    """The median time of one copy of N floats by a C loop compiled and run as the CPU
    kernels are (their compiler, flags, chunks and threads), or None where no kernel
    can be built: on a CPU, a library's copy may use fewer threads than the kernels."""
    import numpy as np

    from mvn_core.adapters import _cpu_kernel, _native

    try:
        copy_loop = _native.library(_COPY_LOOP).mvn_copy
    except _native.KernelUnavailable:
        return None
    copy_loop.argtypes = (ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                          ctypes.c_int32)
    copy_loop.restype = None
    source, target = np.ones(n, np.float32), np.zeros(n, np.float32)
    threads = _cpu_kernel.threads_for(n)

    def copy():
        copy_loop(n, source.ctypes.data, target.ctypes.data, _cpu_kernel.CHUNK, threads)

    return _median_copy_ms(copy, repeat)


def _difference(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def auto_device_kind(unavailable_reason: Callable[[str], str | None], wanted: str) -> str:
    """``wanted``, or for ``"auto"`` the GPU where the backend can run on one, else the CPU."""
    if wanted != "auto":
        return wanted
    return "gpu" if unavailable_reason("gpu") is None else "cpu"


class BackendBench(NamedTuple):
    """What a backend's bench module offers.

    ``device_kind(wanted)`` is ``"cpu"`` or ``"gpu"`` for ``wanted`` in ``"auto"``
    (its GPU where it has one), ``"cpu"``, ``"gpu"``; ``unavailable_reason(kind)`` is
    None where it can run there; ``workload(n, k, kind)`` makes the parameters;
    ``cases()`` lists ours and the peers' (peers whose modules are missing included:
    they are reported as skipped); ``first_steps(workload)``, where given, times our
    default path's first step with an empty kernel cache and with a warm one.
    """

    name: str
    device_kind: Callable[[str], str]
    unavailable_reason: Callable[[str], str | None]
    workload: Callable[[int, int, str], Workload]
    cases: Callable[[], list]
    first_steps: Callable[[Workload], dict] | None = None
