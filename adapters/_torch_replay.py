"""A group's kernel step prepared once and replayed: the per-step work of a torch
optimizer with many tensors, cut to a few passes over them.

A step of the full path (:meth:`RuleOptimizer._plan`) looks up each parameter's
state, checks it, groups the tensors and stores the results back, tensor by tensor:
some microseconds per tensor in Python, more than the arithmetic of a small tensor.
After a group's step on the generated CPU kernel, :class:`Replay` keeps what the next
steps need: the launches, each with its kernel's table of addresses (parameters, state
buffers) and sizes made once, the count, the parameters.  A later step checks that
nothing it relies on changed (the same parameters, each with a gradient, at the same
addresses and of the same sizes; gradients dense, contiguous and of the dtypes seen;
the optimizer's state not written since, which :class:`TrackedState` counts), writes
the gradients' addresses into the tables, computes the step's scalars from the group's
hyperparameters (read at every step, as always) and launches.  The per-tensor reads
run in C++ where :mod:`._torch_gather` is built, else in Python.  Anything else (a new
or reshaped parameter, a loaded or edited state, GAN, DTensors, a gradient missing)
takes the full step, which prepares anew.

The state tensors are the optimizer's own; an assignment to ``optimizer.state[p][name]``
is seen.  Replacing a state tensor's storage behind the optimizer's back (``.data =``,
``set_``) is not: the kernel keeps writing the storage it was prepared with (kept alive
here, so nothing is written to freed memory).
"""

from __future__ import annotations

import array
import operator
from collections import defaultdict
from itertools import repeat
from typing import Any, NamedTuple

import array_api_compat.torch as xp
import torch

from mvn_core._rule import next_count

from . import _cpu_kernel, _torch_gather
from ._torch_sharded import mesh_of

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_ADDRESS = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
_IMPL = operator.attrgetter("_cdata")  # the address of the tensor's C++ TensorImpl


_WRITES = ("__setitem__", "__delitem__", "clear", "pop", "popitem", "setdefault", "update",
           "__ior__")


def _counted(cls):
    """``cls`` with each method that writes a dict calling ``self._changed()`` first."""
    base = cls.__mro__[1]
    for name in _WRITES:
        def write(self, *args, _method=getattr(base, name), **kwargs):
            self._changed()
            return _method(self, *args, **kwargs)
        write.__name__ = name
        setattr(cls, name, write)
    return cls


@_counted
class TrackedState(defaultdict):
    """``optimizer.state`` that counts writes, to itself and to the parameters' state
    dicts made through it: :attr:`version`.  Pickled as torch's own state, a
    ``defaultdict`` of plain dicts."""

    def __init__(self, items=()):
        super().__init__(self._entry)
        self.version = 0
        for key, value in dict(items).items():
            defaultdict.__setitem__(self, key, _Entry(self, value) if type(value) is dict
                                    else value)

    def _entry(self) -> "_Entry":
        return _Entry(self)

    def _changed(self) -> None:
        self.version += 1

    def __reduce__(self):
        return defaultdict, (dict,), None, None, ((k, dict(v) if isinstance(v, dict) else v)
                                                  for k, v in self.items())


@_counted
class _Entry(dict):
    """One parameter's state dict: a write to it counts as one to its owner."""

    __slots__ = ("owner",)

    def __init__(self, owner: TrackedState, *args):
        super().__init__(*args)
        self.owner = owner

    def _changed(self) -> None:
        self.owner._changed()

    def __reduce__(self):
        return dict, (dict(self),)


class _Launch(NamedTuple):
    """One kernel call of the replay, its arrays made once: the C kernel reads ``numel``
    and ``table`` (the tensors' addresses, role after role); only the gradients' part
    of the table is written at each step."""

    members: list[int]
    dtype: Any  # the compute dtype
    names: tuple[str, ...]  # the kernel's dtypes
    numel: array.array  # int64: the members' sizes
    total: int
    table: array.array  # int64: params', gradients', then each state buffer's addresses
    impls: array.array  # int64: the members' params' TensorImpl pointers, for the helper
    grad_types: array.array  # int8: their gradients' dtype codes (the helper's), once known

    def write_grads(self, addresses: list[int]) -> None:
        n = len(self.members)
        self.table[n:2 * n] = array.array("q", addresses)

    def gather(self, helper: _torch_gather.Helper) -> bool:
        """The gradients' addresses written by the C++ helper, which checks each tensor
        as :meth:`Replay._checked_grads` does; False where one differs."""
        n = len(self.members)
        return helper.gather_grads(n, *map(_cpu_kernel.buffer_address, (
            self.impls, self.numel, self.grad_types, self.table))) == n

    def learn_grad_types(self, helper: _torch_gather.Helper) -> None:
        """The gradients' dtype codes in the helper's terms (after a step whose gradients
        were checked in Python, so of the dtypes prepared for)."""
        codes = array.array("b", bytes(len(self.members)))
        if helper.grad_types(len(codes), _cpu_kernel.buffer_address(self.impls),
                             _cpu_kernel.buffer_address(codes)) == len(codes):
            self.grad_types.extend(codes)


class Gathered(NamedTuple):
    """A replay's step found still to hold: the gradients, where they were asked for."""

    grads: list | None


class Replay(NamedTuple):
    """A group's prepared kernel step (see the module's docstring)."""

    rule: Any
    params: list
    impls: list[int]  # the params' TensorImpl pointers (``_cdata``)
    param_addresses: list[int]
    numels: list  # the params' (and their gradients') sizes: the state's
    grad_dtypes: list
    state: TrackedState
    version: int
    count: torch.Tensor
    launches: list[_Launch]
    storages: list  # the state's storages, kept alive

    @classmethod
    def prepare(cls, rule, params, grads, buffer_lists, count,
                state: TrackedState) -> "Replay | None":
        """After a full kernel step of a whole group whose tensors share one count and
        live on the CPU: the replay of it, or None where the kernel did not take them all."""
        tensor_rule = rule.tensor_rule
        if not isinstance(state, TrackedState) or _cpu_kernel.unavailable_reason() is not None:
            return None
        element, per_tensor = _cpu_kernel.split_buffers(tensor_rule, buffer_lists)
        if any(mesh_of(t) is not None or t.device.type != "cpu" or not t.is_contiguous()
               for t in (*params, *(b[i] for b in element for i in range(len(params))))):
            return None
        if len(params) >= _torch_gather.MANY:
            _torch_gather.start()
        impls, addresses = list(map(_IMPL, params)), list(map(_ADDRESS, params))
        numels = list(map(_NUMEL, params))
        launches = []
        for members, dtype in _cpu_kernel.same_dtypes(xp, tensor_rule, params, grads,
                                                      buffer_lists):
            names = _cpu_kernel.dtype_names(params, grads, element, per_tensor, members[0])
            if not _cpu_kernel.supports(names):
                return None
            table = array.array("q", [addresses[i] for i in members])
            table.frombytes(bytes(8 * len(members)))  # the gradients', at each step
            for buffer_list in element + per_tensor:
                table.extend(buffer_list[i].data_ptr() for i in members)
            numel = array.array("q", (numels[i] for i in members))
            launches.append(_Launch(members, dtype, names, numel, sum(numel), table,
                                    array.array("q", (impls[i] for i in members)),
                                    array.array("b")))
        helper = _torch_gather.loaded()  # (a step that has written says nothing more)
        if helper is not None:  # the gradients are those the full step checked
            for launch in launches:
                launch.learn_grad_types(helper)
        storages = [b.untyped_storage() for buffer_list in buffer_lists for b in buffer_list]
        return cls(rule, list(params), impls, addresses, numels,
                   list(map(_DTYPE, grads)), state, state.version, count, launches, storages)

    def gather(self, group: dict, state, keep_grads: bool) -> Gathered | None:
        """Whether this replay still holds for the group (else None), the gradients'
        addresses written into the launches' tables; the gradients themselves where
        ``keep_grads`` or the rule's statistic needs them."""
        params = group["params"]
        if state is not self.state or state.version != self.version:
            return None
        if (len(params) != len(self.params) or not all(map(operator.is_, params, self.params))
                # the same tensors too: torch.utils.swap_tensors exchanges them
                or list(map(_IMPL, params)) != self.impls):
            return None
        keep_grads = keep_grads or self.rule.tensor_rule.statistic is not None
        helper = _torch_gather.helper(many=len(params) >= _torch_gather.MANY)
        if helper is not None and all(launch.grad_types for launch in self.launches):
            if not all(launch.gather(helper) for launch in self.launches):
                return None
            # Only addresses are kept: a gradient freed by another thread during the
            # launch (which runs without the GIL) is a race of the caller's, as with
            # any in-place update.
            return Gathered(list(map(_GRAD, params)) if keep_grads else None)
        grads = self._checked_grads(params)
        if grads is None:
            return None
        addresses = list(map(_ADDRESS, grads))
        whole = len(self.launches) == 1
        for launch in self.launches:
            launch.write_grads(addresses if whole else [addresses[i] for i in launch.members])
            if helper is not None and not launch.grad_types:
                launch.learn_grad_types(helper)
        return Gathered(grads)

    def _checked_grads(self, params: list) -> list | None:
        """The gradients, if each parameter and gradient is as prepared (read in Python)."""
        grads = list(map(_GRAD, params))
        try:
            if (any(map(operator.is_, grads, repeat(None)))
                    or list(map(_DTYPE, grads)) != self.grad_dtypes
                    or not all(map(torch.Tensor.is_contiguous, grads))
                    or list(map(_ADDRESS, params)) != self.param_addresses
                    # a parameter given other data (p.data = ...) may reuse the address;
                    # sizes, not shapes, are compared (reading 10,000 shapes takes 14 ms):
                    # the kernel steps elements, so a reshape of the same size at the
                    # same address steps as before where a full step would refuse it
                    or list(map(_NUMEL, params)) != self.numels
                    or list(map(_NUMEL, grads)) != self.numels):
                return None
        except RuntimeError:  # e.g. a sparse gradient: the full step names it
            return None
        return grads

    def ready(self, gathered: Gathered, hyper: dict, maximize: bool) -> "_Ready | None":
        """The step's launches, every kernel built (nothing written yet), or None where
        one cannot be (the full step says why)."""
        tensor_rule = self.rule.tensor_rule
        hyper = tensor_rule.checked_hyperparameters(hyper)
        decays = tensor_rule.decays(hyper)
        new_count = next_count(xp, self.count)
        scalars = []
        for launch in self.launches:
            step_scalars = tensor_rule.scalars(xp, new_count, launch.dtype, hyper)
            if not _cpu_kernel.buildable(tensor_rule, step_scalars, launch.names, decays,
                                         maximize):
                return None
            scalars.append(step_scalars)
        return _Ready(self, gathered.grads, decays, maximize, new_count, scalars)


class _Ready(NamedTuple):
    replay: Replay
    grads: list | None
    decays: bool
    maximize: bool
    new_count: torch.Tensor
    scalars: list

    def run(self) -> None:
        replay = self.replay
        tensor_rule = replay.rule.tensor_rule
        threads = torch.get_num_threads()
        for launch, step_scalars in zip(replay.launches, self.scalars):
            stats = _cpu_kernel.statistics(xp, tensor_rule, self.grads, launch.members,
                                           launch.dtype, negate_grad=self.maximize)
            _cpu_kernel.launch(tensor_rule, step_scalars, launch.names, self.decays,
                               launch.numel, launch.table,
                               None if stats is None else stats.data_ptr(), threads,
                               self.maximize, launch.total)
        replay.count.copy_(self.new_count)

