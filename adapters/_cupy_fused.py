"""The fused CuPy path of the array optimizers: one multi-tensor kernel launch per step
and batch of arrays that share their dtypes, printed in CUDA C from the rule's traced
mathematics (:mod:`._cuda_source`) over the chunk table of :mod:`._gpu_kernel`,
reading the parameters, gradients and state once and writing the parameters and state
in place.

The kernel is compiled by CuPy (NVRTC) once per rule, dtypes and static options, with
IEEE division and square root and without fused multiply-adds, so that each operation
rounds as it does alone.  The step's scalars are the rule's own, computed by CuPy; a
rule's per-tensor statistic (NovoGrad's squared norm) is CuPy's own reduction, passed
to the kernel per tensor.  Float16 parameters and state are taken (with float32 state
or not); CuPy has no bfloat16 arrays.
"""

from __future__ import annotations

import numpy as np

from mvn_core._rule import next_count

from . import _cpu_kernel, _cuda_source, _elementwise, _gpu_kernel

DTYPES = ("float16", "float32", "float64")


def step(rule, state, params, grads, hyper):
    """One fused step of ``rule`` on CuPy arrays, in place.

    ``params``, ``grads`` and ``state`` must already be checked (shapes, dtypes,
    device).  Returns the new state: the count advanced, the same buffers.  Arrays the
    kernel does not take are refused, before anything is written."""
    import array_api_compat.cupy as xp

    tensor_rule = rule.tensor_rule
    buffer_lists = list(state[1:])
    _check(params, grads, buffer_lists)
    hyper = tensor_rule.checked_hyperparameters(hyper)
    decays = tensor_rule.decays(hyper)
    new_count = next_count(xp, state.count)
    launches, rest = _cpu_kernel.plan(xp, tensor_rule, params, grads, buffer_lists, new_count,
                                      hyper, decays, lambda i: True, build=KERNELS.buildable)
    if rest:
        raise RuntimeError(f"fused=True cannot build the CuPy kernel of {tensor_rule.name}: "
                           "see the warning above; use fused=False")

    def compiled_of(batch):
        return KERNELS.compiled(tensor_rule, _elementwise.describe(batch.step_scalars),
                                batch.names, decays)

    for fn, launch in _gpu_kernel.launches(xp, tensor_rule, launches, params, grads, buffer_lists,
                                           lambda a: a.data.ptr, lambda a: a.size,
                                           compiled_of):
        _run(fn, launch)
    return type(state)(new_count, *buffer_lists)


def _check(params, grads, buffer_lists):
    """Refuse, before any kernel runs, the arrays the kernels do not take."""
    for a in [*params, *grads, *(b for buffer_list in buffer_lists for b in buffer_list)]:
        if str(a.dtype) not in DTYPES:
            raise TypeError(f"fused=True takes float16, float32 and float64 arrays, got "
                            f"{a.dtype}; use fused=False for other dtypes")
        if not a.flags.c_contiguous:
            raise ValueError(f"fused=True takes C-contiguous arrays, got one of shape "
                             f"{a.shape} and strides {a.strides}; use fused=False")


def _build(trace, name: str):
    import cupy

    kernel = _cuda_source.cuda_kernel(trace, name)
    return kernel, cupy.RawKernel(kernel.source, name, options=_cuda_source.OPTIONS)


KERNELS = _gpu_kernel.Kernels(_build)


def _run(fn, launch: _gpu_kernel.Launch) -> None:
    import cupy

    if launch.n_chunks == 0:
        return
    meta = cupy.empty(launch.metadata.size, dtype=cupy.int64)
    meta.set(launch.metadata, stream=cupy.cuda.get_current_stream())
    unused = meta  # an argument the kernel does not read
    fn((launch.n_chunks,), (_cuda_source.THREADS,),
       (meta, np.int64(launch.n_chunks), np.int64(launch.n_tensors), np.int64(_gpu_kernel.CHUNK),
        unused if launch.arrays is None else launch.arrays,
        unused if launch.stats is None else launch.stats,
        unused if launch.old is None else launch.old))
