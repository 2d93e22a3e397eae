"""What the GPU kernels share: the Triton kernel of the torch optimizers
(:mod:`._triton_kernel`) and the CUDA C kernel of the CuPy optimizers
(:mod:`._cupy_fused`) step all tensors of a batch in one launch, over one chunk table.

A launch reads one int64 array, its *metadata*, copied to the device once per launch::

    [ (tensor, start) per chunk | numel per tensor | pointers | numbers ]

Each chunk of :data:`CHUNK` elements of a tensor is one program (Triton) or one block
(CUDA); a tensor without elements still has one chunk where the rule keeps a buffer of
one value per tensor (NovoGrad's ``v``), which that chunk writes.  ``pointers`` holds
one data pointer per role and tensor, role-major (``pointers[r * K + k]``), in the order
of :func:`layout`.  ``numbers`` are the step's scalars that are Python numbers (weak,
double precision), as the bits of float64 values.

The scalars that are arrays (bias corrections computed from the count on the device,
a tensor learning rate) stay on the device: they are stacked into one float64 array
(exact: every value of a narrower dtype is a double), so that nothing is read back to
the host.  So are a rule's statistic (one float64 per tensor) and the old values of
its buffers of one value per tensor: a tensor's first chunk writes those buffers while
its other chunks may still read them, so every chunk reads the values of before the
launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from . import _cpu_kernel, _elementwise
from ._elementwise import Trace
from ._native import KernelUnavailable

CHUNK = 1 << 16  # elements per chunk: one program or block each, as torch's multi-tensor apply
ALIGNMENT = 16  # bytes: pointers all aligned so may be read in vectors (Triton)


class Kernels:
    """The kernels of one printer, each built once per rule, dtypes (param, grad, state,
    state of one value per tensor) and static options by ``build(trace, name)`` (the
    printed kernel, with its ``trace``, and its compiled function); a failure to build
    one (:class:`~._native.KernelUnavailable`) is remembered, and said once in a
    warning where :meth:`buildable` meets it."""

    def __init__(self, build: Callable[[Trace, str], tuple]) -> None:
        self._build = build
        self._compiled = functools.lru_cache(maxsize=None)(self._compile)

    def _compile(self, tensor_rule, description, dtypes, decays, negate_grad):
        try:
            trace = _cpu_kernel.traced(tensor_rule, description, dtypes, decays, negate_grad)
            return self._build(trace, f"mvn_core_{tensor_rule.name}_step")
        except KernelUnavailable as error:
            return error

    def compiled(self, tensor_rule, description: tuple, dtypes: tuple, decays: bool,
                 negate_grad: bool = False) -> tuple:
        """The printed kernel and its compiled function, or KernelUnavailable."""
        built = self._compiled(tensor_rule, description, dtypes, decays, negate_grad)
        if isinstance(built, KernelUnavailable):
            raise built
        return built

    def buildable(self, tensor_rule, step_scalars, dtypes: tuple, decays: bool,
                  negate_grad: bool = False) -> bool:
        """Whether the kernel of this step can be built (it is, now, if need be); the
        ``build`` of :func:`._cpu_kernel.plan`."""
        try:
            self.compiled(tensor_rule, _elementwise.describe(step_scalars), dtypes, decays,
                          negate_grad)
            return True
        except KernelUnavailable as error:
            _cpu_kernel._warn_once(str(error))
            return False

    def count(self) -> int:
        """How many kernels were built (or failed to) in this process."""
        return self._compiled.cache_info().currsize

    def forget(self) -> None:
        """Forget the kernels built in this process (as a new process starts)."""
        self._compiled.cache_clear()


@dataclass(frozen=True)
class Kernel:
    """A printed GPU kernel: its name, its source and the trace it prints."""

    name: str
    source: str
    trace: Trace


class Layout(NamedTuple):
    """What a launch of a trace's kernel carries where, as the printers read it."""

    roles: tuple[str, ...]  # the order of the pointer table
    dtypes: dict  # the dtype name of each role's arrays
    tensor_buffers: tuple[str, ...]  # the roles of buffers of one value per tensor
    numbers: tuple[str, ...]  # the step's scalars in the metadata (weak Python numbers)
    arrays: tuple[str, ...]  # those stacked on the device (0-d arrays)


def layout(trace: Trace) -> Layout:
    """The pointer table's roles: the parameter, the gradient, the buffers of one value
    per element, those of one value per tensor, and the updates' output when the
    kernel does not update the parameter in place (the CPU kernel's order); the step's
    scalars of each kind, in the trace's order."""
    outputs = {name: dtype for name, _, dtype in trace.outputs}
    inputs = {i.name: i for i in trace.inputs}
    element = [f"b_{n}" for n in trace.buffer_names if n not in trace.tensor_buffers]
    tensor = tuple(f"b_{n}" for n in trace.buffer_names if n in trace.tensor_buffers)
    roles = ("p", "g", *element, *tensor, *(() if "p" in outputs else ("update",)))
    dtypes = {r: inputs[r].dtype if r in inputs else outputs.get(r, trace.dtypes["param"])
              for r in roles}
    weak = {n: inputs[f"s_{n}"].weak for n in trace.scalars}
    return Layout(roles, dtypes, tensor, tuple(n for n in trace.scalars if weak[n]),
                  tuple(n for n in trace.scalars if not weak[n]))


def metadata(numel: Sequence[int], pointers: Sequence[Sequence[int]], numbers: Sequence[float],
             per_tensor: bool, chunk: int | None = None) -> tuple[np.ndarray, int]:
    """The metadata of a launch (see above) and its number of chunks.  ``per_tensor``:
    the rule has buffers of one value per tensor (an empty tensor gets a chunk);
    ``chunk`` defaults to :data:`CHUNK`."""
    chunk = chunk or CHUNK
    counts = np.asarray(numel, dtype=np.int64)
    chunks = -(-counts // chunk)
    if per_tensor:
        chunks = np.maximum(chunks, 1)
    n_chunks = int(chunks.sum())
    first = np.repeat(np.cumsum(chunks) - chunks, chunks)
    table = np.empty((n_chunks, 2), dtype=np.int64)
    table[:, 0] = np.repeat(np.arange(len(counts)), chunks)
    table[:, 1] = (np.arange(n_chunks) - first) * chunk
    flat_pointers = np.asarray([a for role in pointers for a in role], dtype=np.uint64)
    bits = np.asarray(numbers, dtype=np.float64)
    return np.concatenate([table.reshape(-1), counts, flat_pointers.view(np.int64),
                           bits.view(np.int64)]), n_chunks


def aligned(pointers: Sequence[Sequence[int]]) -> bool:
    return all(a % ALIGNMENT == 0 for role in pointers for a in role)


def step_arrays(xp, step_scalars, names: Sequence[str], device) -> Any:
    """The step's array scalars ``names`` of ``step_scalars`` as one float64 array on ``device``
    (None where there are none)."""
    if not names:
        return None
    return xp.stack([xp.astype(xp.asarray(getattr(step_scalars, n), device=device), xp.float64)
                     for n in names])


def old_values(xp, per_tensor_buffer_lists: list, members: Sequence[int]) -> Any:
    """The buffers of one value per tensor of ``members``, as one float64 array
    (buffer-major), or None for a rule without such buffers."""
    if not per_tensor_buffer_lists:
        return None
    return xp.stack([xp.astype(xp.reshape(buffer_list[i], ()), xp.float64)
                     for buffer_list in per_tensor_buffer_lists for i in members])


class Launch(NamedTuple):
    """What one kernel call reads, on the host and on the device."""

    metadata: np.ndarray
    n_chunks: int
    n_tensors: int
    aligned: bool
    arrays: Any  # float64 device array of the step's array scalars, or None
    stats: Any  # float64 device array, one per tensor, or None
    old: Any  # float64 device array of the buffers of one value per tensor, or None


def launches(xp, tensor_rule, planned: list, params, grads, buffer_lists, address: Callable,
             numel: Callable, compiled: Callable, statistics=None, negate_grad=False):
    """For each of the batches ``planned`` by :func:`._cpu_kernel.plan`: its compiled
    kernel and what that reads.  ``compiled(batch)`` is the printed kernel (whose
    ``trace`` is read here) and its compiled function; ``address(array)`` is an array's
    data pointer, ``numel(array)`` its number of elements; ``statistics`` as for
    :func:`._cpu_kernel.run`."""
    element, per_tensor = _cpu_kernel.split_buffers(tensor_rule, buffer_lists)
    for planned_launch in planned:
        members, dtype, _, step_scalars = planned_launch
        kernel, function = compiled(planned_launch)
        device = params[members[0]].device
        stats = _cpu_kernel.statistics(xp, tensor_rule, grads, members, dtype, statistics,
                                       negate_grad)
        pointers = [[address(params[i]) for i in members], [address(grads[i]) for i in members]]
        pointers += [[address(b[i]) for i in members] for b in element + per_tensor]
        where = layout(kernel.trace)
        meta, n_chunks = metadata([numel(params[i]) for i in members], pointers,
                                  [float(getattr(step_scalars, n)) for n in where.numbers],
                                  bool(per_tensor))
        yield function, Launch(meta, n_chunks, len(members), aligned(pointers),
                             step_arrays(xp, step_scalars, where.arrays, device), stats,
                             old_values(xp, per_tensor, members))
