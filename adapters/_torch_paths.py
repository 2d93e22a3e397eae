"""How the torch optimizers execute a step: three paths over one rule's mathematics.

* ``reference`` (``foreach=False``): ``rule.update``, the pure function, tensor by
  tensor, with fresh arrays for every result.  The definition the others are checked
  against.
* ``kernel`` (the default where it is available; ``fused=True`` asks for it): the
  rule's per-tensor mathematics traced into one generated multi-tensor kernel
  (:mod:`._cpu_kernel` on the CPU), one call per batch of tensors that share their
  dtypes, each element read and written once.  Bit for bit the reference's results.
* ``multi_tensor`` (``foreach=True``, and where no kernel can be built): the same
  per-tensor mathematics (``TensorRule.step_tensor``) run on lists of tensors, with
  PyTorch's multi-tensor kernels (:mod:`._torch_lists`), in lists of about
  :data:`CHUNK` elements so that the temporaries stay in cache; state and params are
  written in place.  Bit for bit the reference's results.

Each path takes one batch of parameters that share a step count and a device, their
gradients and their state buffers (one list per buffer name), and returns the new
count and buffers; params are updated in place.  The paths are written for plain
tensors; :mod:`._torch_sharded` runs them for batches of DTensors.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import array_api_compat.torch as xp
import torch

from mvn_core._rule import next_count
from mvn_core.registry import Rule

from . import _cpu_kernel, _triton_kernel
from ._torch_lists import TensorList
from ._torch_lists import namespace as lists

CHUNK = 1 << 17  # elements per multi-tensor list: its temporaries stay in the caches


def reference(rule: Rule, params, grads, buffer_lists, count, hyper):
    state = rule.state_type(count, *(tuple(buffer_list) for buffer_list in buffer_lists))
    updates, new = rule.update(state, grads, params, **hyper)
    for p, u in zip(params, updates):
        p.add_(u)
    return new.count, [list(buffer_list) for buffer_list in new[1:]]


def multi_tensor(rule: Rule, params, grads, buffer_lists, count, hyper, statistics=None):
    """``statistics``: the rule's statistic of each tensor, when it is not to be taken
    of the tensors given (they are the local shards of DTensors: :mod:`._torch_sharded`)."""
    tensor_rule = rule.tensor_rule
    hyper = tensor_rule.checked_hyperparameters(hyper)
    decays = tensor_rule.decays(hyper)
    new_count = next_count(xp, count)
    device = params[0].device if params else None
    hyper = {k: _on(v, device) for k, v in hyper.items()}
    for members, dtype in _cpu_kernel.same_dtypes(xp, tensor_rule, params, grads, buffer_lists):
        step_scalars = tensor_rule.scalars(xp, new_count, dtype, hyper)
        for chunk in _chunks(members, params, grads, buffer_lists, statistics,
                             split=rule.per_coordinate):
            p = chunk.params
            update, new = tensor_rule.step_tensor(lists, step_scalars, chunk.grads,
                                                  p if decays else None, chunk.buffers,
                                                  p.dtype, chunk.statistics)
            torch._foreach_add_(p.tensors, update.tensors)
            for buffer, value in zip(chunk.buffers, new):
                torch._foreach_copy_(buffer.tensors, value.tensors)
    return new_count, buffer_lists


def kernel(rule: Rule, params, grads, buffer_lists, count, hyper, statistics=None, strict=False):
    """The generated multi-tensor kernel: one call per batch of tensors that share
    their dtypes.  Tensors it does not take (on another device than the CPU, not
    contiguous, or of other dtypes) run :func:`multi_tensor`; with ``strict``
    (``fused=True``) they are refused instead, before anything is written.
    ``statistics``: as for :func:`multi_tensor`.  On CUDA the kernel is generated in
    Triton (:mod:`._triton_kernel`), likewise."""
    if params and _triton_kernel.steps_on(params[0].device):
        device = params[0].device
        return _triton_kernel.torch_step(rule, params, grads, buffer_lists, count,
                                         {k: _on(v, device) for k, v in hyper.items()},
                                         statistics, strict, fallback=multi_tensor)
    tensor_rule = rule.tensor_rule
    hyper = tensor_rule.checked_hyperparameters(hyper)
    decays = tensor_rule.decays(hyper)
    new_count = next_count(xp, count)
    element, _ = _cpu_kernel.split_buffers(tensor_rule, buffer_lists)

    def takes(i):
        return (params[i].device.type == "cpu" and params[i].is_contiguous()
                and grads[i].is_contiguous() and all(b[i].is_contiguous() for b in element))

    available = _cpu_kernel.unavailable_reason() is None
    launches, rest = _cpu_kernel.plan(xp, tensor_rule, params, grads, buffer_lists, new_count,
                                      hyper, decays, takes if available else lambda i: False)
    if strict and rest:
        raise RuntimeError(_refusal(params[rest[0]], grads[rest[0]]))
    _cpu_kernel.run(xp, tensor_rule, launches, params, grads, buffer_lists, decays,
                    torch.Tensor.data_ptr, torch.Tensor.numel, statistics,
                    threads=torch.get_num_threads())
    if rest:
        multi_tensor(rule, [params[i] for i in rest], [grads[i] for i in rest],
                     [[buffer_list[i] for i in rest] for buffer_list in buffer_lists], count, hyper,
                     None if statistics is None else [statistics[i] for i in rest])
    return new_count, buffer_lists


def _refusal(p, g) -> str:
    reason = _cpu_kernel.unavailable_reason() or (
        "the generated kernel takes contiguous float16, bfloat16, float32 and float64 CPU "
        "tensors")
    return (f"fused=True cannot step a parameter of shape {tuple(p.shape)}, dtype {p.dtype} on "
            f"{p.device} (gradient contiguous: {g.is_contiguous()}): {reason}; leave fused "
            "unset to fall back to the multi-tensor path")


PATHS = {"reference": reference, "multi_tensor": multi_tensor, "kernel": kernel,
         "fused": functools.partial(kernel, strict=True)}


def _on(value, device):
    """An array hyperparameter on the params' device (multi-tensor kernels on CUDA refuse
    a CPU scalar tensor)."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


class _Chunk(NamedTuple):
    """Tensors of about CHUNK elements in all, stepped as one array each."""

    params: TensorList
    grads: TensorList
    buffers: tuple[TensorList, ...]
    statistics: TensorList | None  # the rule's statistic per tensor, where given


def _chunks(members, params, grads, buffer_lists, statistics, split):
    """The tensors ``members`` in :class:`_Chunk` s of about CHUNK elements.

    With ``split`` (a per-coordinate rule) large contiguous tensors are cut into flat
    views of CHUNK elements; otherwise (a per-tensor norm) tensors stay whole."""
    given = [] if statistics is None else [statistics]
    rows, size = [], 0
    for i in members:
        row = [params[i], grads[i], *(b[i] for b in buffer_lists), *(s[i] for s in given)]
        for piece in _pieces(row, split):
            rows.append(piece)
            size += piece[0].numel()
            if size >= CHUNK:
                yield _chunk(rows, len(buffer_lists), bool(given))
                rows, size = [], 0
    if rows:
        yield _chunk(rows, len(buffer_lists), bool(given))


def _chunk(rows, n_buffers, with_statistics) -> _Chunk:
    """The rows (param, grad, buffers..., statistic) as one :class:`_Chunk`."""
    columns = [TensorList(t) for t in zip(*rows)]
    return _Chunk(columns[0], columns[1], tuple(columns[2:2 + n_buffers]),
                  columns[-1] if with_statistics else None)


def _pieces(row: list[Any], split: bool):
    n = row[0].numel()
    contiguous = all(t.is_contiguous() and t.numel() == n for t in row)
    if not split or n <= CHUNK or not contiguous:
        yield row
        return
    flat = [t.view(-1) for t in row]
    for start in range(0, n, CHUNK):
        yield [t[start:start + CHUNK] for t in flat]
