"""Gradient Autoscaled Normalization: a gradient transform placed in front of a rule.

Yun, arXiv 2509.03677 (2025).  The paper's exact formula for the autoscale was not
reachable; this is the project's reading (ALGORITHMS.md section 2): zero-centre each
eligible tensor, then scale all of them by one factor derived from their *global*
standard deviation, so that no single low-variance tensor is amplified on its own.
The scale is a pluggable strategy so that the paper's rule can be dropped in.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from ._inputs import resolve_dtype
from ._rule import (
    as_array,
    checked_params,
    compute_dtype,
    guard,
    new_count,
    open_call,
    register_state_type,
)

CENTERS = ("tensor", "channel")
SCALES = ("global_std", "none")


class GANState(NamedTuple):
    """GAN's state: the count, and ``extra``, what a custom ``scale`` strategy keeps."""

    count: Any
    extra: tuple = ()


register_state_type(GANState, "gan")


def gan_init(params: Any, *, state_dtype: Any = None) -> GANState:
    """State for :func:`gan_update`: the count only (``state_dtype`` is checked, unused)."""
    xp, arrays = checked_params(params)
    resolve_dtype(xp, state_dtype)
    return GANState(new_count(xp, arrays[0]))


def gan_update(state: GANState, grads: Any, params: Any = None, *, center: str = "tensor",
               scale: str | Callable = "global_std"):
    """Transform ``grads`` (not an update: feed the result to a rule).  Returns
    ``(transformed_grads, new_state)``.

    Eligible tensors are those with ``ndim >= 2`` (conv and linear weights); the others
    (biases, norms, 0-d) pass through unchanged.  For the eligible tensors ``l``::

        c_l   = g_l - mean(g_l)                        # center="tensor": whole tensor
                                                       # center="channel": all axes but the first
        sigma = sqrt(sum_l sum_i c_l,i^2 / sum_l n_l)  # one global standard deviation
        out_l = alpha c_l,   alpha = 1 / (sigma + 1e-12)

    ``scale="none"`` gives ``alpha = 1`` (plain gradient centralization); a callable
    ``scale(sigma, state)`` returns ``alpha``, or ``(alpha, extra)`` to keep ``extra`` in
    ``state.extra`` (it sees ``()`` on the first step unless the caller seeded it).
    Statistics are computed in at least float32.  Compose with a base rule::

        g_hat, gan_state = gan_update(gan_state, grads)
        updates, sgd_state = sgd_update(sgd_state, g_hat, params, lr=0.1, momentum=0.9)
    """
    check_options(center, scale)
    call = open_call("gan", GANState, state, grads, params, {})
    xp = call.xp
    count = as_array(xp, state.count + 1)
    out = list(call.grads)
    eligible = [i for i, g in enumerate(out) if g.ndim >= 2]
    if not eligible:
        return call.rebuild(out), GANState(count, state.extra)
    dtype = compute_dtype(xp, *(out[i].dtype for i in eligible))
    centred = {i: _centre(xp, xp.astype(out[i], dtype, copy=False), center) for i in eligible}
    alpha, extra = _autoscale(xp, dtype, scale, centred.values(), GANState(count, state.extra))
    for i, c in centred.items():
        out[i] = as_array(xp, xp.astype(c if alpha is None else alpha * c, out[i].dtype, copy=False))
    return call.rebuild(out), GANState(count, extra)


def check_options(center, scale):
    """Refuse unknown ``center`` and ``scale`` options."""
    if center not in CENTERS:
        raise ValueError(f"center={center!r}: expected one of {CENTERS}")
    if not callable(scale) and scale not in SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {SCALES} or a callable")


def _centre(xp, g, center):
    """``g`` minus its mean over the whole tensor or over all axes but the first.

    The mean is taken of ``g - g[0, ...]`` (per channel: of ``g - g[:, 0, ...]``), which
    changes nothing in exact arithmetic but makes a constant tensor centre to exact
    zeros; otherwise its rounding residue would be blown up to O(1) by the autoscale.
    """
    if math.prod(g.shape) == 0:
        return g
    kept = 0 if center == "tensor" else 1
    reference = g[(slice(None),) * kept + (slice(0, 1),) * (g.ndim - kept)]
    shifted = g - reference
    axes = tuple(range(kept, g.ndim))
    return shifted - xp.sum(shifted, axis=axes, keepdims=True) / math.prod(g.shape[kept:])


def _autoscale(xp, dtype, scale, centred, state):
    """The global factor alpha (None for 1) and the strategy's new ``extra``."""
    if scale == "none":
        return None, state.extra
    centred = list(centred)
    n = sum(math.prod(c.shape) for c in centred)
    sigma = xp.sqrt(sum(xp.sum(c * c) for c in centred) / max(n, 1))
    if scale == "global_std":
        return 1 / (sigma + guard(xp, dtype, 1e-12)), state.extra
    result = scale(sigma, state)
    alpha, extra = result if isinstance(result, tuple) else (result, state.extra)
    return alpha, extra
