"""PyTorch in ``mvn-core bench``: our optimizers (:mod:`mvn_core.adapters.torch`) on
their three paths (the generated kernel, the default; torch's multi-tensor kernels;
the pure rule), and the peers configured with the same hyperparameters:
``torch.optim`` Adam, AdamW (foreach and fused; fused AdamW is the baseline) and SGD,
timm's LaProp, AdaBelief (foreach) and NvNovoGrad, and ``adabelief_pytorch.AdaBelief``
(both loop over the tensors in Python: path ``loop``)."""

from __future__ import annotations

import functools
import time

import mvn_core
from mvn_core import backends

from .timing import (OURS, BackendBench, BenchCase, MemoryProbe, Stepper, Workload,
                           auto_device_kind, hyperparameters, split_sizes)
from mvn_core.conformance import oracle
from mvn_core.conformance.targets import device_name

NAME = "torch"
# Our paths, by the options that select them (see mvn_core.adapters._torch_paths).
PATHS = {"kernel": {}, "multi_tensor": {"foreach": True}, "reference": {"foreach": False}}


def _torch():
    import torch

    return torch


def device_kind(wanted: str) -> str:
    return auto_device_kind(unavailable_reason, wanted)


def unavailable_reason(kind: str) -> str | None:
    reason = backends.get(NAME).unavailable_reason()
    if reason is None and kind == "gpu" and not _torch().cuda.is_available():
        reason = "torch finds no CUDA device"
    return reason


def workload(n: int, k: int, kind: str) -> Workload:
    torch = _torch()
    device = torch.device("cuda", torch.cuda.current_device()) if kind == "gpu" else torch.device("cpu")
    generator = torch.Generator(device).manual_seed(0)
    sizes = split_sizes(n, k)
    params = [torch.randn(size, generator=generator, device=device) for size in sizes]
    grads = [torch.randn(size, generator=generator, device=device) for size in sizes]
    for p, g in zip(params, grads):
        p.grad = g
    cuda = device.type == "cuda"
    return Workload(NAME, device, device_name(device), params, grads,
                    CudaMemory(device) if cuda else MemoryProbe(),
                    functools.partial(_make_copy, n, device),
                    torch.cuda.get_device_name(device) if cuda else "")


def _make_copy(n, device):
    torch = _torch()
    source, target = torch.ones(n, device=device), torch.empty(n, device=device)

    def copy():
        target.copy_(source)
        _synchronize(device)

    return copy


def _synchronize(device) -> None:
    if device.type == "cuda":
        _torch().cuda.synchronize(device)


class CudaMemory:
    """Memory allocated by PyTorch on a CUDA device (its caching allocator's counts)."""

    source = "torch.cuda memory_allocated / max_memory_allocated"

    def __init__(self, device):
        self.device = device

    def current(self) -> int:
        return _torch().cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        _torch().cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return _torch().cuda.max_memory_allocated(self.device)


def _stepper(optimizer, device) -> Stepper:
    def step():
        optimizer.step()
        _synchronize(device)

    def state_bytes():
        torch = _torch()
        return sum(t.nbytes for state in optimizer.state.values() for t in state.values()
                   if torch.is_tensor(t))

    return Stepper(step, state_bytes)


# --- ours ------------------------------------------------------------------------------

def _ours(rule_name: str, options: dict, work: Workload) -> Stepper:
    from mvn_core.adapters import _torch_gather, torch as adapters

    cls = getattr(adapters, mvn_core.rules[rule_name].class_name)
    h = hyperparameters(rule_name)
    betas = tuple(h.pop(name) for name in cls.beta_names)
    if betas:
        h["betas"] = betas
    stepper = _stepper(cls(work.params, **h, **options), work.device)
    return stepper._replace(settle=_torch_gather.wait_if_started)


# --- the peers: those of the rules' oracle entries that name paths to time ---------------

BASELINE = ("torch.optim.AdamW", "fused")  # the row every other is read against


def _peer(peer, rule_name: str, path: str, work: Workload) -> Stepper:
    h = {**hyperparameters(rule_name), **peer.hyper}
    options = {} if path == "loop" else {path: True}
    make = peer.bench_make or peer.make
    return _stepper(make(work.params, h, **options), work.device)


def _peer_cases() -> list[BenchCase]:
    found = [BenchCase(NAME, rule_name, peer.name, path,
                       functools.partial(_peer, peer, rule_name, path), requires=peer.requires,
                       baseline=(peer.name, path) == BASELINE)
             for rule_name, entry in oracle.ENTRIES.items() for peer in entry.peers
             if peer.library == "torch" for path in peer.bench]
    return sorted(found, key=lambda case: not case.baseline)


def cases() -> list[BenchCase]:
    ours = [BenchCase(NAME, rule.name, OURS, path, functools.partial(_ours, rule.name, options),
                 slow=path == "reference", compiled=path == "kernel")
            for rule in mvn_core.rules.values() if rule.kind == "optimizer"
            for path, options in PATHS.items()]
    return [*_peer_cases(), *ours]


def first_steps(work: Workload) -> dict:
    """Seconds of MVN-Grad's first default step (state made, kernel built), from an
    empty kernel cache (it compiles) and from a warm one (a new process's start: it
    loads the compiled kernel), each on a fresh optimizer.  On CUDA, Triton's cache of
    compiled kernels is emptied alike."""
    import os
    import tempfile
    from unittest import mock

    from mvn_core.adapters import _cpu_kernel, _torch_gather, _triton_kernel, torch as adapters

    seconds = {}
    with tempfile.TemporaryDirectory() as folder, _cpu_kernel.cache_dir_set_to(folder), \
            mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": os.path.join(folder, "triton")}):
        for cache in ("cold", "warm"):
            _cpu_kernel.forget_compiled()  # as a new process starts
            _triton_kernel.forget_compiled()
            params = [p.detach().clone().requires_grad_() for p in work.params]
            for p, g in zip(params, work.grads):
                p.grad = g
            opt = adapters.MVNGrad(params, lr=1e-3)
            started = time.perf_counter()
            opt.step()
            backends.get(NAME).synchronize()
            seconds[f"{cache}_s"] = time.perf_counter() - started
            del opt, params
        _torch_gather.wait_if_started()  # a build the steps started ends in this cache
    _cpu_kernel.forget_compiled()  # the benchmark's other rows use the usual caches
    _triton_kernel.forget_compiled()
    return seconds


BENCH = BackendBench(NAME, device_kind, unavailable_reason, workload, cases, first_steps)
