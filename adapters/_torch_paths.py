"""How the torch optimizers execute a step: three paths over one rule's mathematics.

* ``reference``: ``rule.update``, the pure function, tensor by tensor, with fresh arrays
  for every result.  The definition the others are checked against.
* ``multi_tensor`` (the default): the same per-tensor mathematics
  (``TensorRule.step_tensor``) run on lists of tensors, with PyTorch's multi-tensor
  kernels (:mod:`._torch_lists`), in lists of about :data:`CHUNK` elements so that the
  temporaries stay in cache; state and params are written in place.  Bit for bit the
  reference's results.
* ``fused``: ``step_tensor`` compiled by ``torch.compile`` (inductor) for batches of
  :data:`BATCH` tensors, into fused kernels that read and write each byte once.  Its
  hyperparameters are passed as float64 tensors (a schedule does not recompile; torch
  rounds a 0-d float64 tensor into a float32 operation as it does a Python number), so
  its rounding differs from the reference's only where the compiler reassociates or
  the bias corrections are formed in float64: a few units in the last place.

Each path takes one batch of parameters that share a step count and a device, their
gradients and their state buffers (one list per buffer name), and returns the new
count and buffers; params are updated in place.  The paths are written for plain
tensors; :mod:`._torch_sharded` runs them for batches of DTensors.
"""

from __future__ import annotations

import functools
import itertools
import types
from typing import Any

import array_api_compat.torch as xp
import torch

from mvn_core._rule import next_count
from mvn_core.registry import Rule

from ._torch_lists import TensorList
from ._torch_lists import namespace as lists

CHUNK = 1 << 17  # elements per multi-tensor list: its temporaries stay in the caches
BATCH = 16  # tensors per compiled call: compile time grows with it, overhead shrinks
# (a group's last, shorter batch compiles once more: every list length is a graph)


def reference(rule: Rule, params, grads, columns, count, hyper):
    state = rule.state_type(count, *(tuple(column) for column in columns))
    updates, new = rule.update(state, grads, params, **hyper)
    for p, u in zip(params, updates):
        p.add_(u)
    return new.count, [list(column) for column in new[1:]]


def multi_tensor(rule: Rule, params, grads, columns, count, hyper, statistics=None):
    """``statistics``: the rule's statistic of each tensor, when it is not to be taken
    of the tensors given (they are the local shards of DTensors: :mod:`._torch_sharded`)."""
    tensor_rule = rule.tensor_rule
    hyper = tensor_rule.checked_hyperparameters(hyper)
    decays = tensor_rule.decays(hyper)
    new_count = next_count(xp, count)
    device = params[0].device if params else None
    hyper = {k: _on(v, device) for k, v in hyper.items()}
    given = [] if statistics is None else [statistics]
    for members, dtype, _ in _same_dtypes(params, grads, columns, tensor_rule=tensor_rule):
        c = tensor_rule.scalars(xp, new_count, dtype, hyper)
        for part in _lists(members, params, grads, columns + given, split=rule.per_coordinate):
            p, g, old = part[0], part[1], tuple(part[2:2 + len(columns)])
            statistic = part[-1] if given else None
            update, new = tensor_rule.step_tensor(lists, c, g, p if decays else None, old,
                                                  p.dtype, statistic)
            torch._foreach_add_(p.tensors, update.tensors)
            for buffer, value in zip(old, new):
                torch._foreach_copy_(buffer.tensors, value.tensors)
    return new_count, columns


def fused(rule: Rule, params, grads, columns, count, hyper):
    tensor_rule = rule.tensor_rule
    hyper = tensor_rule.checked_hyperparameters(hyper)
    decays = tensor_rule.decays(hyper)
    flags = tuple(sorted((k, v) for k, v in hyper.items() if isinstance(v, bool)))
    new_count = next_count(xp, count)
    odd = [i for i in range(len(params)) if not _compilable(params[i], grads[i], columns, i)]
    for members, dtype, dtypes in _same_dtypes(params, grads, columns, set(odd), tensor_rule):
        device = params[members[0]].device
        wide = torch.float64 if device.type != "mps" else torch.float32
        as_tensors = {k: _as_tensor(v, wide, device) for k, v in hyper.items()}
        c = tensor_rule.scalars(xp, new_count, dtype, as_tensors, hyper_dtype=wide)
        for start in range(0, len(members), BATCH):
            batch = members[start:start + BATCH]
            kernel = _compiled_kernel(tensor_rule, (dtypes, wide, device.type, decays, flags,
                                                    len(batch)))
            kernel(c, [_flat(params[i]) for i in batch], [_flat(grads[i]) for i in batch],
                   [[_flat(column[i]) for i in batch] for column in columns], decays)
    if odd:  # tensors of one element or not contiguous: each would compile apart
        pick = sorted(odd)
        multi_tensor(rule, [params[i] for i in pick], [grads[i] for i in pick],
                     [[column[i] for i in pick] for column in columns], count, hyper)
    return new_count, columns


def _compilable(p, g, columns, i):
    """Whether a tensor goes through the compiled kernel: contiguous (it is seen as a
    flat view, so every shape shares one compilation) and of more than one element
    (empty tensors have nothing to do; a length of 1 would be specialised apart)."""
    tensors = [p, g, *(column[i] for column in columns)]
    return p.numel() > 1 and all(t.is_contiguous() for t in tensors)


def _flat(t):
    # 0-d buffers (NovoGrad's v) become 1-element views too: besides sharing one
    # compilation, this avoids an inductor bug (torch 2.13, CPU) that drops in-place
    # writes into 0-d float64 graph inputs.
    return t.view(-1)


PATHS = {"reference": reference, "multi_tensor": multi_tensor, "fused": fused}


def _on(value, device):
    """An array hyperparameter on the params' device (multi-tensor kernels on CUDA refuse
    a CPU scalar tensor)."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _as_tensor(value, dtype, device):
    # Python numbers would be baked into the compiled code: a new value would recompile.
    if isinstance(value, float):
        return torch.tensor(value, dtype=dtype, device=device)
    return value


_KERNEL_NUMBERS = itertools.count()


@functools.cache
def _compiled_kernel(tensor_rule, key):
    """The compiled step of ``tensor_rule`` for one combination ``key`` of the tensors'
    dtypes, device type, static options and batch length; shapes are dynamic.  Each key gets a code object
    of its own, hence a compilation cache of its own: torch.compile stops recompiling a
    code object after a few variants and would silently fall back to eager."""

    def kernel(c, params, grads, columns, decays):
        for i, (p, g) in enumerate(zip(params, grads)):
            old = tuple(column[i] for column in columns)
            update, new = tensor_rule.step_tensor(xp, c, g, p if decays else None, old, p.dtype)
            p.add_(update)
            for buffer, value in zip(old, new):
                buffer.copy_(value)

    name = f"{tensor_rule.name}_step_{next(_KERNEL_NUMBERS)}"
    code = kernel.__code__.replace(co_name=name)
    own = types.FunctionType(code, kernel.__globals__, name, None, kernel.__closure__)
    return torch.compile(own, dynamic=True)


def _same_dtypes(params, grads, columns, exclude=frozenset(), tensor_rule=None):
    """Indices of the tensors sharing gradient, state and parameter dtypes, and the
    dtype the rule computes them in (the core's promotion)."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if i in exclude:
            continue
        key = (g.dtype, p.dtype, *(column[i].dtype for column in columns))
        groups.setdefault(key, []).append(i)
    return [(members, tensor_rule.compute_dtype(xp, *key), key) for key, members in groups.items()]


def _lists(members, params, grads, columns, split):
    """TensorLists (params, grads, *buffers) of about CHUNK elements each.

    With ``split`` (a per-coordinate rule) large contiguous tensors are cut into flat
    views of CHUNK elements; otherwise (a per-tensor norm) tensors stay whole."""
    rows, size = [], 0
    for i in members:
        row = [params[i], grads[i], *(column[i] for column in columns)]
        for piece in _pieces(row, split):
            rows.append(piece)
            size += piece[0].numel()
            if size >= CHUNK:
                yield [TensorList(t) for t in zip(*rows)]
                rows, size = [], 0
    if rows:
        yield [TensorList(t) for t in zip(*rows)]


def _pieces(row: list[Any], split: bool):
    n = row[0].numel()
    contiguous = all(t.is_contiguous() and t.numel() == n for t in row)
    if not split or n <= CHUNK or not contiguous:
        yield row
        return
    flat = [t.view(-1) for t in row]
    for start in range(0, n, CHUNK):
        yield [t[start:start + CHUNK] for t in flat]
