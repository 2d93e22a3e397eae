"""The CPU kernel path, shared by the PyTorch and NumPy adapters: a rule traced
(:mod:`._elementwise`), printed as one multi-tensor C function (:mod:`._c_source`),
compiled once (:mod:`._native`), and launched once per batch of tensors that share
their dtypes.

A launch takes the tensors' element counts and data pointers, and the step's scalars
as computed by the rule itself with the arrays' own library (``TensorRule.scalars``:
bias corrections and all), so that the kernel repeats the pure rule's arithmetic on
the same numbers.  A rule's per-tensor statistic (NovoGrad's squared norm) is also
the library's own reduction (``TensorRule.statistics``): its order of summation is
the library's, which a kernel could not reproduce bit for bit.
"""

from __future__ import annotations

import array
import contextlib
import functools
import os
import warnings
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Sequence

from . import _c_source, _elementwise, _native

CHUNK = 1 << 15  # elements per chunk of the parallel loop: 128 kB of float32 per array
SERIAL = 1 << 16  # below this many elements a launch runs on one thread
DTYPES = frozenset(_elementwise.FLOATING)


KernelUnavailable = _native.KernelUnavailable


def unavailable_reason() -> str | None:
    """Why kernels cannot be built here (said once in a warning too), or None."""
    try:
        _native.compiler()
        return None
    except KernelUnavailable as error:
        _warn_once(str(error))
        return str(error)


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"mvn-core runs a slower path (PyTorch's multi-tensor kernels, else the "
                  f"pure rule) instead of a generated kernel: {reason}", RuntimeWarning,
                  stacklevel=4)


def buildable(tensor_rule, step_scalars: SimpleNamespace, dtypes: tuple, decays: bool,
              negate_grad: bool = False) -> bool:
    """Whether the kernel of this step compiles (it is compiled now if need be); a
    failure is said once in a warning."""
    try:
        compiled(tensor_rule, _elementwise.describe(step_scalars), dtypes, decays, negate_grad)
        return True
    except KernelUnavailable as error:
        _warn_once(str(error))
        return False


def forget_compiled() -> None:
    """Forget the kernels loaded in this process (the disk cache stays), as a new
    process starts: for measuring first steps."""
    _compiled.cache_clear()
    _native._load.cache_clear()


@contextlib.contextmanager
def cache_dir_set_to(folder: str):
    """Compile into, and load from, ``folder`` meanwhile (``MVN_CORE_CACHE_DIR``)."""
    old = os.environ.get("MVN_CORE_CACHE_DIR")
    os.environ["MVN_CORE_CACHE_DIR"] = folder
    try:
        yield
    finally:
        if old is None:
            del os.environ["MVN_CORE_CACHE_DIR"]
        else:
            os.environ["MVN_CORE_CACHE_DIR"] = old


def supports(dtypes: Sequence[str]) -> bool:
    return all(d in DTYPES for d in dtypes)


def compiled(tensor_rule, description: tuple, dtypes: tuple, decays: bool,
             negate_grad: bool = False) -> tuple[_c_source.CpuKernel, Callable]:
    """The kernel of ``tensor_rule`` for one combination of dtypes (param, grad, state,
    state of one value per tensor) and static options, and its compiled function.
    Raises :class:`~._native.KernelUnavailable` where none can be built (once: the
    failure is remembered)."""
    built = _compiled(tensor_rule, description, dtypes, decays, negate_grad)
    if isinstance(built, KernelUnavailable):
        raise built
    return built


@functools.lru_cache(maxsize=None)
def _compiled(tensor_rule, description, dtypes, decays, negate_grad):
    try:
        return _build(tensor_rule, description, dtypes, decays, negate_grad)
    except KernelUnavailable as error:
        return error


def traced(tensor_rule, description: tuple, dtypes: tuple, decays: bool,
           negate_grad: bool = False, in_place: bool = True) -> _elementwise.Trace:
    """The trace of a kernel (every printer's input) for ``dtypes`` (param, grad, state,
    state of one value per tensor; ``in_place=False``: one that writes the updates
    instead of the parameters), or :class:`KernelUnavailable`."""
    names = dict(zip(("param", "grad", "state", "tensor_state"), dtypes))
    try:
        return _elementwise.trace(tensor_rule, description, names, decays=decays,
                                  in_place=in_place, negate_grad=negate_grad)
    except (NotImplementedError, AttributeError, TypeError) as error:
        # e.g. a rule of the user's calling a function that kernels do not have
        raise KernelUnavailable(f"{tensor_rule.name} cannot be traced into a kernel: "
                                f"{error}") from error


def source(tensor_rule, description: tuple, dtypes: tuple, decays: bool, *,
           negate_grad: bool = False, in_place: bool = True) -> _c_source.CpuKernel:
    """The C source of the kernel of :func:`compiled` (``in_place=False``: one that
    writes the updates instead of the parameters), or
    :class:`~._native.KernelUnavailable` where the rule cannot be traced."""
    trace = traced(tensor_rule, description, dtypes, decays, negate_grad, in_place)
    return _c_source.cpu_kernel(trace, f"mvn_core_{tensor_rule.name}_step")


def _build(tensor_rule, description, dtypes, decays, negate_grad):
    kernel = source(tensor_rule, description, dtypes, decays, negate_grad=negate_grad)
    return kernel, _native.function(kernel.source, kernel.name)


def step(tensor_rule, step_scalars: SimpleNamespace, dtypes: tuple, decays: bool,
         numel: Sequence[int],
         pointers: Sequence[Sequence[int]], stats: Any = None, threads: int | None = None,
         negate_grad: bool = False) -> None:
    """One launch: ``pointers`` per role of the kernel (:attr:`CpuKernel.roles`), each a
    list of data pointers, one per tensor; ``stats`` the address of the statistics as
    float64 (one per tensor) for a rule that has one."""
    table = array.array("q")
    for role in pointers:
        table.extend(role)
    launch(tensor_rule, step_scalars, dtypes, decays, array.array("q", numel), table, stats,
           threads, negate_grad)


def launch(tensor_rule, step_scalars: SimpleNamespace, dtypes: tuple, decays: bool,
           numel: array.array, table: array.array, stats: Any = None,
           threads: int | None = None, negate_grad: bool = False,
           total: int | None = None) -> None:
    """:func:`step` with its arrays made: ``numel`` the tensors' sizes (int64), ``table``
    their data pointers (int64), role after role; ``total``: the sum of ``numel`` where
    it is known."""
    kernel, fn = compiled(tensor_rule, _elementwise.describe(step_scalars), dtypes, decays,
                          negate_grad)
    scalars = array.array("d", (_double(getattr(step_scalars, name)) for name in kernel.scalars))
    total = sum(numel) if total is None else total
    fn(len(numel), buffer_address(numel), buffer_address(table), buffer_address(scalars),
       stats or None,
       CHUNK, threads_for(total, threads))


def threads_for(total: int, threads: int | None = None) -> int:
    """The threads of a launch over ``total`` elements: one below :data:`SERIAL`, else
    ``threads`` (default: the processors this process may run on)."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if total < SERIAL else max(1, threads)


def buffer_address(buffer: array.array) -> int:
    """The address of an ``array.array``'s items (0 when it has none), for a C call."""
    return buffer.buffer_info()[0] if len(buffer) else 0


def _double(value: Any) -> float:
    """A scalar of the step as a double: exact for float32 and float64 values."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    return float(value.item() if hasattr(value, "item") else value)


class Launch(NamedTuple):
    """One kernel call: the tensors (indices), their compute dtype, the kernel's dtype
    names (param, grad, state, state of one value per tensor) and the step's scalars."""

    members: list[int]
    dtype: Any
    names: tuple[str, ...]
    step_scalars: SimpleNamespace


def plan(xp, tensor_rule, params, grads, buffer_lists, new_count, hyper, decays,
         takes: Callable[[int], bool], negate_grad: bool = False, build: Callable | None = None
         ) -> tuple[list[Launch], list[int]]:
    """The launches of one step, and the tensors left to another path: those that
    ``takes`` refuses (``takes(i)``: the library's conditions, e.g. device and
    contiguity), whose dtypes have no kernel, or whose kernel cannot be built.  Every
    kernel is compiled here, before anything is written.  ``negate_grad``: the rule
    gets ``-g`` (``maximize``).  ``build``: whether a kernel can be built, and builds
    it (:func:`buildable`'s arguments; default :func:`buildable`, the CPU kernel)."""
    build = build or buildable
    launches, rest = [], []
    element, per_tensor = split_buffers(tensor_rule, buffer_lists)
    for members, dtype in same_dtypes(xp, tensor_rule, params, grads, buffer_lists):
        names = dtype_names(params, grads, element, per_tensor, members[0])
        if not (supports(names) and all(takes(i) for i in members)):
            rest += members
            continue
        step_scalars = tensor_rule.scalars(xp, new_count, dtype, hyper)
        if build(tensor_rule, step_scalars, names, decays, negate_grad):
            launches.append(Launch(members, dtype, names, step_scalars))
        else:
            rest += members
    return launches, rest


def run(xp, tensor_rule, launches: list[Launch], params, grads, buffer_lists, decays,
        address: Callable[[Any], int], numel: Callable[[Any], int], given=None,
        threads: int | None = None, negate_grad: bool = False) -> None:
    """Launch the kernels of :func:`plan` (with its ``negate_grad``).  ``address(array)``
    is an array's data pointer, ``numel(array)`` its number of elements;
    ``given``: the rule's statistic per tensor where it is not to be taken of ``grads``
    (local shards of sharded tensors), else None."""
    element, per_tensor = split_buffers(tensor_rule, buffer_lists)
    for members, dtype, names, step_scalars in launches:
        stats = statistics(xp, tensor_rule, grads, members, dtype, given, negate_grad)
        pointers = [[address(params[i]) for i in members], [address(grads[i]) for i in members]]
        pointers += [[address(b[i]) for i in members] for b in element + per_tensor]
        step(tensor_rule, step_scalars, names, decays, [numel(params[i]) for i in members],
             pointers,
             None if stats is None else address(stats), threads, negate_grad)


def dtype_names(params, grads, element, per_tensor, i) -> tuple[str, ...]:
    """The kernel's dtypes (param, grad, state, state of one value per tensor) of the
    ``i``-th tensors, by name; ``element`` and ``per_tensor`` as :func:`split_buffers`."""
    names = [params[i].dtype, grads[i].dtype, (element or per_tensor)[0][i].dtype]
    names += [per_tensor[0][i].dtype] if per_tensor else []
    return tuple(str(n).rsplit(".", 1)[-1] for n in names)


def same_dtypes(xp, tensor_rule, params, grads, buffer_lists) -> list[tuple[list[int], Any]]:
    """Indices of the tensors sharing gradient, parameter and state dtypes, and the
    dtype the rule computes them in (the core's promotion)."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        key = (g.dtype, p.dtype, *(buffer_list[i].dtype for buffer_list in buffer_lists))
        groups.setdefault(key, []).append(i)
    return [(members, tensor_rule.compute_dtype(xp, *key)) for key, members in groups.items()]


def split_buffers(tensor_rule, buffer_lists) -> tuple[list, list]:
    """The state's buffer lists in the kernel's order: those of per-element buffers, and
    those of one value per tensor."""
    scalar = tensor_rule.scalar_buffers
    named = list(zip(tensor_rule.buffer_names, buffer_lists))
    return ([b for n, b in named if n not in scalar], [b for n, b in named if n in scalar])


def statistics(xp, tensor_rule, grads, members, dtype, given=None, negate_grad=False):
    """The rule's statistic of each tensor as one float64 array, by the library's own
    reductions (the pure rule's), or None for a rule without one."""
    if tensor_rule.statistic is None:
        return None
    if given is not None:
        values = [given[i] for i in members]
    else:
        # -g, exactly, as the pure rule sees it
        values = tensor_rule.statistics(xp, [(-grads[i] if negate_grad else grads[i], dtype)
                                             for i in members])
    return xp.astype(xp.stack([xp.reshape(v, ()) for v in values]), xp.float64)
