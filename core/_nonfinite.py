"""What a step does with non-finite gradients: by default, IEEE arithmetic; on request,
nothing at all.

By default a rule computes with a NaN or an Inf as IEEE arithmetic does, and the
non-finite value stays in the state (each rule's docstring says where it spreads).
Mixed-precision training, whose loss scaling produces Inf gradients on purpose now and
then, wants such a step skipped instead: :func:`skip_if_nonfinite` wraps an update so
that a call whose gradients hold a NaN or an Inf anywhere changes nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from ._inputs import as_array_list, is_array, namespace_of
from ._together import reduced_together


def all_finite(grads: Any) -> Any:
    """Whether every element of ``grads`` (one array or a flat list/tuple of arrays) is
    finite, as a 0-d boolean array of their library.  No value is read: it costs no
    device synchronisation and works under ``jax.jit``; on arrays sharded over
    processes its reductions are combined in one collective (:func:`reduced_together`)."""
    arrays, _ = as_array_list("grads", grads)
    if not arrays:
        return True
    xp = namespace_of(arrays)
    # The number of non-finite elements, counted in float32 (a sum, which sharded arrays
    # combine linearly; a count cannot overflow float32, and an empty array counts 0).
    # No arithmetic on the gradients themselves: Inf * 0 would raise NumPy's warning.
    partials = [xp.sum(xp.astype(xp.logical_not(xp.isfinite(a)), xp.float32)) for a in arrays]
    return xp.sum(reduced_together(xp, partials)) == 0


def skip_if_nonfinite(update: Callable, *, select_state: Callable | None = None) -> Callable:
    """``update`` (a rule's ``<rule>_update``, or any function of that signature) made
    to skip every step whose gradients are not all finite.

    The wrapped function takes and returns what ``update`` does, with the same state.
    A skipped step returns the state it was given (count and buffers: the same values)
    and updates that change nothing: ``-0.0`` for an optimizer (``x + -0.0`` is ``x``,
    bit for bit, for every ``x``), the gradients themselves for a gradient transform
    (GAN), so that a wrapped rule after it skips too.  The state's ``count`` does not
    advance: ``new_state.count == state.count`` tells a skipped step (as an array, so
    that nothing is read).  The choice is made with ``where`` on one 0-d flag
    (:func:`all_finite`): no host synchronisation, and it works under ``jax.jit``.

    ``select_state(finite, new_state, state)`` keeps the old state where ``finite`` is
    false; by default field by field among the tuples of arrays a rule's state holds.
    An adapter whose state has fields of another shape (the optax adapter's packed
    buffers) gives its own.

    Input errors are raised as ``update`` raises them, skipped step or not::

        update = mvn_core.skip_if_nonfinite(mvn_core.mvn_update)
        updates, state = update(state, grads, params, lr=1e-3)
    """
    transform = _is_transform(update)

    @functools.wraps(update)
    def guarded(state: Any, grads: Any, params: Any = None, **hyperparameters: Any):
        out, new_state = update(state, grads, params, **hyperparameters)
        grad_list, _ = as_array_list("grads", grads)
        if not grad_list:
            return out, new_state
        finite = all_finite(grad_list)
        out_list, rebuild = as_array_list("updates", out)
        xp = namespace_of(out_list + grad_list)
        kept = grad_list if transform else [-xp.zeros_like(u) for u in out_list]
        out = rebuild([xp.where(finite, u, k) for u, k in zip(out_list, kept)])
        if select_state is not None:
            return out, select_state(finite, new_state, state)
        return out, _select(xp, finite, new_state, state)

    guarded.__doc__ = (f"{update.__name__}, skipping steps whose gradients are not all "
                       f"finite (see mvn_core.skip_if_nonfinite).\n\n{update.__doc__ or ''}")
    return guarded


def _is_transform(update: Callable) -> bool:
    from .registry import rules  # the registry imports the rules, which import this module

    return any(rule.update is update and rule.kind == "transform" for rule in rules.values())


def _select(xp: Any, finite: Any, new: Any, old: Any) -> Any:
    """``new`` where ``finite``, else ``old``: field by field, array by array."""
    fields = []
    for name, a, b in zip(new._fields, new, old):
        if is_array(a):
            fields.append(xp.where(finite, a, b))
        elif isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
            fields.append(tuple(xp.where(finite, x, y) for x, y in zip(a, b)))
        else:
            raise TypeError(f"state.{name} changed its structure in the step: a skipped step "
                            "cannot keep the old one under one array flag")
    return type(new)(*fields)
