"""A group's kernel step prepared once and replayed: the per-step work of a torch
optimizer with many tensors, cut to a few passes over them.

A step of the full path (:meth:`RuleOptimizer._plan`) looks up each parameter's
state, checks it, groups the tensors and stores the results back, tensor by tensor:
some microseconds per tensor in Python, more than the arithmetic of a small tensor.
After a group's step on the generated CPU kernel, :class:`Replay` keeps what the next
steps need: the launches (tensors, dtypes), the state buffers' addresses, the count,
the parameters and their addresses.  A later step checks that nothing it relies on
changed (the same parameters, each with a gradient, at the same addresses; gradients
contiguous and of the dtypes seen; the optimizer's state not written since, which
:class:`TrackedState` counts), gathers the gradients' addresses, computes the step's
scalars from the group's hyperparameters (read at every step, as always) and launches.
Anything else (a new or reshaped parameter, a loaded or edited state, GAN, DTensors, a
gradient missing) takes the full step, which prepares anew.

The state tensors are the optimizer's own; an assignment to ``optimizer.state[p][name]``
is seen.  Replacing a state tensor's storage behind the optimizer's back (``.data =``,
``set_``) is not: the kernel keeps writing the storage it was prepared with (kept alive
here, so nothing is written to freed memory).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from itertools import repeat
from typing import Any, NamedTuple

import array_api_compat.torch as xp
import torch

from mvn_core._rule import next_count

from . import _cpu_kernel
from ._torch_sharded import mesh_of

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_ADDRESS = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel


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
    members: list[int]
    dtype: Any  # the compute dtype
    names: tuple[str, ...]  # the kernel's dtypes
    numel: list[int]
    buffers: list[list[int]]  # the state buffers' addresses, per role of the kernel


class Replay(NamedTuple):
    """A group's prepared kernel step (see the module's docstring)."""

    rule: Any
    params: list
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
        launches = []
        for members, dtype in _cpu_kernel.same_dtypes(xp, tensor_rule, params, grads,
                                                      buffer_lists):
            names = _cpu_kernel.dtype_names(params, grads, element, per_tensor, members[0])
            if not _cpu_kernel.supports(names):
                return None
            buffers = [[b[i].data_ptr() for i in members] for b in element + per_tensor]
            launches.append(_Launch(members, dtype, names, [params[i].numel() for i in members],
                                    buffers))
        storages = [b.untyped_storage() for buffer_list in buffer_lists for b in buffer_list]
        return cls(rule, list(params), list(map(_ADDRESS, params)), list(map(_NUMEL, params)),
                   list(map(_DTYPE, grads)), state, state.version, count, launches, storages)

    def grads_if_unchanged(self, group: dict, state) -> list | None:
        """The group's gradients if this replay still holds for it, else None."""
        params = group["params"]
        if state is not self.state or state.version != self.version:
            return None
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return None
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

    def ready(self, grads: list, hyper: dict, maximize: bool) -> "_Ready | None":
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
        return _Ready(self, grads, decays, maximize, new_count, scalars)


class _Ready(NamedTuple):
    replay: Replay
    grads: list
    decays: bool
    maximize: bool
    new_count: torch.Tensor
    scalars: list

    def run(self) -> None:
        replay, grads = self.replay, self.grads
        tensor_rule = replay.rule.tensor_rule
        threads = torch.get_num_threads()
        grad_addresses = list(map(_ADDRESS, grads))
        whole = len(replay.launches) == 1
        for launch, c in zip(replay.launches, self.scalars):
            members = launch.members
            params = replay.param_addresses if whole else [replay.param_addresses[i]
                                                           for i in members]
            gradients = grad_addresses if whole else [grad_addresses[i] for i in members]
            stats = _cpu_kernel.statistics(xp, tensor_rule, grads, members, launch.dtype,
                                           negate_grad=self.maximize)
            _cpu_kernel.step(tensor_rule, c, launch.names, self.decays, launch.numel,
                             [params, gradients, *launch.buffers],
                             None if stats is None else stats.data_ptr(), threads,
                             self.maximize)
        replay.count.copy_(self.new_count)
