"""Steps on DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism).

A DTensor is one logical tensor held in shards by several processes.  The paths of
:mod:`._torch_paths` are written for plain tensors; a batch of DTensors runs so:

* a per-coordinate rule (all but NovoGrad) runs its path on each process's local
  shards (``to_local()``: tensors that share the DTensors' storage, so the in-place
  writes land in the parameters and their state).  A coordinate's step needs that
  coordinate alone, hence no collective; the multi-tensor kernels, and under
  ``fused=True`` the compiled ones, see ordinary tensors.
* NovoGrad needs each tensor's squared norm over the whole logical tensor: the norms
  are computed on the DTensors and reduced together, in one collective per batch
  (:meth:`TensorRule.statistics`), and the rest of its step runs on the local shards
  with the multi-tensor kernels (under ``fused=True`` too: its compiled kernel would
  take the norm of the local shard).
* ``foreach=False`` is the pure rule itself, on the DTensors, with DTensor's operators
  (NovoGrad's norms cost the same one collective there).

The state that the rule's init makes from DTensor parameters is made of DTensors laid
out as the parameters, so each process holds the state of its own shards only.
"""

from __future__ import annotations

import array_api_compat.torch as xp
import torch

from mvn_core.registry import Rule

from . import _torch_paths

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # builds without torch.distributed have no DTensors to handle
    class DTensor:  # noqa: D101 - a type nothing is an instance of
        pass


def mesh_of(p):
    """The device mesh of a DTensor (None for a plain tensor): a batch that reduces
    statistics together must live on one mesh."""
    return p.device_mesh if isinstance(p, DTensor) else None


def path(name: str):
    """The step function of path ``name`` for batches of plain tensors or of DTensors."""
    plain = _torch_paths.PATHS[name]
    if name == "reference":
        return plain

    def run(rule: Rule, params, grads, buffer_lists, count, hyper):
        if not isinstance(params[0], DTensor):
            return plain(rule, params, grads, buffer_lists, count, hyper)
        return _on_local_shards(plain, rule, params, grads, buffer_lists, count, hyper)

    return run


def _on_local_shards(plain, rule, params, grads, buffer_lists, count, hyper):
    options = {}
    if rule.tensor_rule.statistic is not None:
        options["statistics"] = _statistics(rule, params, grads, buffer_lists)
    new_count, _ = plain(rule, _local(params), _local(grads), [_local(c) for c in buffer_lists],
                         count, hyper, **options)
    return new_count, buffer_lists  # written in place, through the local shards


def _local(tensors):
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _statistics(rule, params, grads, buffer_lists):
    """The rule's statistic of each whole logical gradient, as plain 0-d tensors (the
    same value on every process), in each tensor's compute dtype."""
    dtypes = [rule.tensor_rule.compute_dtype(xp, g.dtype, b.dtype, p.dtype)
              for p, g, b in zip(params, grads, buffer_lists[0])]
    values = rule.tensor_rule.statistics(xp, list(zip(grads, dtypes)))
    # full_tensor(): the value of the whole logical tensor, whatever placement the
    # combined reduction was left in (already replicated: no communication).
    return [v.full_tensor() if isinstance(v, DTensor) else v for v in values]
