"""Gradient Autoscaled Normalization: a gradient transform placed in front of a rule.

Yun, arXiv 2509.03677 (2025).  The paper's exact formula for the autoscale was not
reachable; this is the project's reading (docs/algorithms.md, "GAN"): zero-centre each
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
    next_count,
    open_call,
    register_state_type,
)
from ._together import reduced_together
from .rule import Hyperparameter, Rule

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

    A NaN or an Inf in an eligible tensor makes every eligible tensor's output NaN (the
    scale is global); :func:`mvn_core.skip_if_nonfinite` around both functions skips
    such steps instead (wrapped, GAN passes the gradients through, and the rule skips).
    """
    check_options(center, scale)
    call = open_call("gan", GANState, state, grads, params, {})
    xp = call.xp
    count = next_count(xp, state.count)
    out = list(call.grads)
    eligible = [i for i, g in enumerate(out) if g.ndim >= 2]
    if not eligible:
        return call.rebuild(out), GANState(count, state.extra)
    dtype = compute_dtype(xp, *(out[i].dtype for i in eligible))
    grads = [xp.astype(out[i], dtype, copy=False) for i in eligible]
    centred, squares = _centred(xp, grads, center)
    alpha, extra = _autoscale(xp, dtype, scale, centred, squares, GANState(count, state.extra))
    for i, c in zip(eligible, centred):
        out[i] = as_array(xp, xp.astype(c if alpha is None else alpha * c, out[i].dtype, copy=False))
    return call.rebuild(out), GANState(count, extra)


def check_options(center, scale):
    """Refuse unknown ``center`` and ``scale`` options."""
    if center not in CENTERS:
        raise ValueError(f"center={center!r}: expected one of {CENTERS}")
    if not callable(scale) and scale not in SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {SCALES} or a callable")


def _centred(xp, grads, center):
    """Each gradient minus its mean over the whole tensor (``center="tensor"``) or over
    all axes but the first (``center="channel"``), and, where they come for free, the
    sums of squares of the centred tensors (else None).

    The mean is subtracted twice: ``r = g - mean(g)``, then ``r - mean(r)``.  That
    changes nothing in exact arithmetic, but a constant tensor centres to exact zeros
    where one subtraction would leave a rounding residue that the autoscale would blow
    up to O(1): ``r`` is then one number repeated, a few units in the last place of
    the constant, whose ``n`` copies sum exactly, so that its mean is itself (certain
    while ``n`` times those units stays below 2**24 in float32; in practice far
    beyond, e.g. 64M elements).  It needs sums only, combined for all tensors at once
    (:func:`reduced_together`), so on sharded arrays the whole centring costs two
    collectives per step; a shift by one given entry of each tensor (its first) would
    gather it from the process that holds it, tensor by tensor, and a maximum fails on
    a process whose shard is empty.  Channels are centred tensor by tensor: their
    statistics are as many as the channels, and under the usual sharding over the
    first axis they need no collective at all.
    """
    whole = [k for k, g in enumerate(grads) if math.prod(g.shape) > 0]  # empty: no mean
    out, squares = list(grads), None
    if center == "channel":
        for k in whole:
            out[k] = _centre_channels(xp, grads[k])
    elif whole:
        centred, squares = _centre_tensors(xp, [grads[k] for k in whole])
        for k, c in zip(whole, centred):
            out[k] = c
    return out, squares


def _centre_tensors(xp, grads):
    """The centred tensors and their sums of squares, in two combined reductions:
    the sums of ``g``, then the sums of ``r = g - mean(g)`` and of ``r**2``.  The sum of
    squares of ``c = r - mean(r)`` is ``sum(r**2) - sum(r)**2 / n``, where ``sum(r)`` is
    rounding-small: no cancellation."""
    sizes = [math.prod(g.shape) for g in grads]
    sums = reduced_together(xp, [xp.sum(g) for g in grads])
    residues = [g - sums[k] / n for k, (g, n) in enumerate(zip(grads, sizes))]
    moments = reduced_together(xp, [xp.sum(r) for r in residues] +
                                   [xp.sum(r * r) for r in residues])
    first, second = moments[:len(grads)], moments[len(grads):]
    centred = [r - first[k] / n for k, (r, n) in enumerate(zip(residues, sizes))]
    squares = xp.stack([second[k] - first[k] * first[k] / n for k, n in enumerate(sizes)])
    return centred, squares


def _centre_channels(xp, g):
    axes = tuple(range(1, g.ndim))
    size = math.prod(g.shape[1:])
    residue = g - xp.sum(g, axis=axes, keepdims=True) / size
    return residue - xp.sum(residue, axis=axes, keepdims=True) / size


def _autoscale(xp, dtype, scale, centred, squares, state):
    """The global factor alpha (None for 1) and the strategy's new ``extra``.

    ``squares``: the centred tensors' sums of squares, if already known; else they are
    computed here, combined in one reduction.  Their total is clipped at zero, which
    a one-pass sum may undershoot by rounding when every tensor is constant."""
    if scale == "none":
        return None, state.extra
    if squares is None:
        squares = reduced_together(xp, [xp.sum(c * c) for c in centred])
    n = sum(math.prod(c.shape) for c in centred)
    sigma = xp.sqrt(xp.clip(xp.sum(squares), min=0.0) / max(n, 1))
    if scale == "global_std":
        return 1 / (sigma + guard(xp, dtype, 1e-12)), state.extra
    result = scale(sigma, state)
    alpha, extra = result if isinstance(result, tuple) else (result, state.extra)
    return alpha, extra


GAN = Rule(
    name="gan", title="Gradient Autoscaled Normalization", class_name="GAN", init=gan_init,
    update=gan_update, state_type=GANState, kind="transform", per_coordinate=False,
    reference="Yun, arXiv 2509.03677 (2025)", tensor_rule=None,
    hyperparameters={"center": Hyperparameter("tensor", "option"),
                     "scale": Hyperparameter("global_std", "option")},
    check=lambda h: check_options(h["center"], h["scale"]),
    settings=({}, {"center": "channel"}, {"scale": "none"}), order=10)
