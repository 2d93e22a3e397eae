"""NumPy and CuPy in ``mvn-core bench``: our in-place optimizers over arrays
(:mod:`mvn_core.adapters.arrays`): on NumPy their default (path ``arrays``: the
generated C kernel), on CuPy ``fused=True`` (path ``fused``: the generated CUDA
kernel; CuPy's default is the pure rule).  No peer runs here, so these rows are
compared with the copy bandwidth only.  CuPy runs on GPUs only; NumPy on the CPU only."""

from __future__ import annotations

import functools

import mvn_core
from mvn_core import backends

from .timing import (OURS, BackendBench, BenchCase, MemoryProbe, Stepper, Workload,
                           hyperparameters, split_sizes)

KINDS = {"numpy": "cpu", "cupy": "gpu"}  # where each library runs
PATHS = {"numpy": ("arrays", {}), "cupy": ("fused", {"fused": True})}  # name, options


def _library(name):
    import importlib

    return importlib.import_module(name)


def _device_kind(name: str, wanted: str) -> str:
    return KINDS[name] if wanted == "auto" else wanted


def _unavailable_reason(name: str, kind: str) -> str | None:
    if kind != KINDS[name]:
        return f"{name} runs on the {KINDS[name].upper()} only"
    return backends.get(name).unavailable_reason()


def _workload(name: str, n: int, k: int, kind: str) -> Workload:
    lib = _library(name)
    rng = lib.random.default_rng(0)
    sizes = split_sizes(n, k)
    params = [rng.standard_normal(size, dtype=lib.float32) for size in sizes]
    grads = [rng.standard_normal(size, dtype=lib.float32) for size in sizes]
    if name == "numpy":
        return Workload(name, "cpu", "cpu", params, grads, MemoryProbe(),
                        functools.partial(_make_copy, name, n))
    device = lib.cuda.Device()
    return Workload(name, device, f"cuda{device.id}", params, grads, PoolMemory(),
                    functools.partial(_make_copy, name, n),
                    lib.cuda.runtime.getDeviceProperties(device.id)["name"].decode())


def _make_copy(name, n):
    lib = _library(name)
    source, target = lib.ones(n, dtype=lib.float32), lib.empty(n, dtype=lib.float32)

    def copy():
        lib.copyto(target, source)
        backends.get(name).synchronize()

    return copy


class PoolMemory:
    """CuPy's default memory pool: ``used_bytes`` now; for the peak, the pool's size
    (``total_bytes``, used and cached blocks) after its cache was emptied before the
    steps, an upper bound (blocks are rounded up and may not be reused)."""

    source = "cupy memory pool (peak: an upper bound)"

    def _pool(self):
        return _library("cupy").get_default_memory_pool()

    def current(self) -> int:
        return self._pool().used_bytes()

    def reset_peak(self) -> None:
        self._pool().free_all_blocks()

    def peak(self) -> int:
        return self._pool().total_bytes()


def _ours(name: str, rule_name: str, work: Workload) -> Stepper:
    from mvn_core.adapters.arrays import OPTIMIZERS

    options = PATHS[name][1]
    optimizer = OPTIMIZERS[rule_name](list(work.params), **options, **hyperparameters(rule_name))
    synchronize = backends.get(name).synchronize

    def step():
        optimizer.step(work.grads)
        synchronize()

    def state_bytes():
        state = optimizer.state
        return sum(b.nbytes for column in state[1:] for b in column) + state.count.nbytes

    return Stepper(step, state_bytes)


def _cases(name: str) -> list[BenchCase]:
    return [BenchCase(name, rule.name, OURS, PATHS[name][0], functools.partial(_ours, name, rule.name))
            for rule in mvn_core.rules.values() if rule.kind == "optimizer"]


def _bench(name: str) -> BackendBench:
    return BackendBench(name, functools.partial(_device_kind, name),
                        functools.partial(_unavailable_reason, name),
                        functools.partial(_workload, name), functools.partial(_cases, name))


NUMPY = _bench("numpy")
CUPY = _bench("cupy")
