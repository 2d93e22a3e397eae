"""Per-tensor reductions of one step, combined together before any is read.

A rule that needs a statistic of each tensor (NovoGrad's squared norm, GAN's shifts
and means) computes it for every tensor of the call first, combines the results into
one array here, and only then reads them.  On one device this costs a stack of a few
numbers.  On arrays sharded over processes it is what keeps the number of collectives
independent of the number of tensors: a reduction of a sharded array is first one
partial result per process, and PyTorch's DTensor (FSDP2's parameters) carries it
unreduced through stacking, indexing and linear arithmetic, combining it only where a
value meets the sharded tensor again.  Read tensor by tensor, each statistic would cost
a collective of its own; stacked and settled here, all of them cost one.  (Under
``jax.jit`` the compiler sees the whole step and schedules the reductions itself.)
"""

from __future__ import annotations

from typing import Any


def reduced_together(xp: Any, partials: list) -> Any:
    """``partials`` (0-d reductions of one dtype) as one 1-d array whose values are
    final; read them by indexing it.

    Adding zero changes no value, but it is an affine operation, which a library
    cannot apply to unreduced partial results without knowing that the number is
    zero (each process would add it): a sharding-aware library combines the stacked
    partial results first, all of them in one collective.
    """
    return xp.stack(partials) + 0.0
