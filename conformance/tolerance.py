"""How far a run in a floating dtype may lie from the float64 oracle, and why.

The model is a rounding analysis, not a number tuned until tests pass.  It bounds the
error of *well-conditioned* problems, and says where that assumption enters.  Let
``eps`` be the dtype's machine epsilon.  For a run whose inputs (initial parameters and
gradients) are exactly the oracle's:

* one step's elementwise arithmetic perturbs the direction by at most ``OPS * eps``
  relative.  A step is about twenty correctly rounded operations, with the Python
  hyperparameters rounded into the dtype; products, quotients, square roots and sums of
  same-sign terms pass relative errors on with a factor of at most one, so their errors
  add.  The subtractions that can cancel (``g - m``, MaxVA's ``v/w - mean^2``) are where
  conditioning enters: the model assumes the cancelled part is not much larger than
  what remains (the gradients' mean not much larger than their spread), as in
  :func:`~.problems.make_problem`.  MaxVA breaks the bound when the mean is ~1e3 times
  the spread (float32): its averaging weight then depends on rounding (see its docs);
* a state buffer kept as an exponential average with factor ``beta`` accumulates the
  rounding of every step it remembers: after ``t`` steps at most
  ``min(t, 1 / (1 - beta)) * eps`` relative.  The direction inherits the relative
  error of every buffer it depends on (the rule's ``memories``), at most once each (a square
  root halves it, which is ignored in favour of safety).  In float16 and bfloat16 this
  term is large (with ``b2 = 0.999`` a bfloat16 ``v`` cannot even decrease: 0.999 v
  rounds back to v); the bound stays honest and simply allows much more there;
* a reduction over ``n`` entries (NovoGrad's norm, GAN's statistics), summed pairwise
  or in blocks as NumPy, PyTorch and XLA do, adds ``log2(n) + 1`` eps;
* writing ``theta + update`` rounds once more, by ``eps |theta|``;
* a rule whose update jumps as a value crosses zero (Lion's sign; ``Entry.switches``)
  may land on the other side where that value lies within ``kappa_t * eps`` of zero,
  relative to the terms it is summed from: there the jump is allowed, from that step
  on (it is not undone later);
* what a rule's own arithmetic adds, as its oracle entry says (``Entry.rounding``):
  AdaBelief's rectification, whose ``rho_t`` is a small difference of two large
  numbers.  (The reference computes it exactly; a step whose ``rho_t`` lies within
  that error of the threshold 5 could take the other branch, which the tests would
  report.)

Summed over the steps, coordinate by coordinate, with the oracle's own updates
``u*_t`` and parameters ``theta*_t``::

    |theta_T - theta*_T| <= eps * sum_{t<=T} (kappa_t |u*_t| + |theta*_t|)
    kappa_t = OPS + reduction(n) + sum_{beta in memories} min(t, 1 / (1 - beta)) + own(t)

The bound grows with the number of steps, as rounding does.  It assumes an exact
reference; the float64 oracle is exact enough for float32 and narrower dtypes, and for
a float64 run, where the oracle rounds as much as the run, ``eps`` is counted twice.
eps-dominated coordinates need no term of their own: where ``sqrt(v)`` is tiny or
underflows, the denominator ``sqrt(v) + eps`` is dominated by ``eps`` and its relative
error stays below ``eps``.  Errors in the parameters feed back through weight decay
only multiplied by ``lr * weight_decay`` (< 1e-2 in the tests), which OPS absorbs.

How it is read.  The inputs of a checked run are exact in its dtype (the problem is
rounded to it, :func:`~.problems.rounded`, or exact in every dtype at once,
:func:`~.problems.portable`), as the model requires, and the state is kept in the run's
dtype.  A run passes when every coordinate at every step lies within its bound;
``mvn-core check`` reports the largest ``error / bound`` as the fraction of the bound
used.  Storing ``theta`` in the dtype alone costs up to half an ULP, half of the
``eps |theta*|`` term, so a correct run typically uses 0.3 to 0.5 of its bound in the
first steps, where that term dominates; the memory terms take over as steps
accumulate, fastest in float16 and bfloat16.  A wrong formula or constant leaves the
bound within a few steps: one coordinate off by 1e-3 relative at one step exceeds it in
float32 and float64, by 10% in float16.
"""

from __future__ import annotations

import math

import numpy as np

import mvn_core

from . import oracle

OPS = 16


def machine_eps(dtype) -> float:
    """The spacing of the dtype's numbers at 1 (by name; NumPy has no bfloat16)."""
    return 2.0 ** -7 if dtype == "bfloat16" else float(np.finfo(dtype).eps)


def spacing(dtype, values) -> np.ndarray:
    """The dtype's unit in the last place at each of ``values`` (float64): the distance
    from ``|x|`` rounded down to a power of two to the next number of the dtype, i.e.
    ``2**(e - p + 1)`` with ``e = floor(log2 |x|)`` but not below the smallest normal
    exponent (subnormals are evenly spaced), and ``p`` the significand's bits.  A
    difference divided by it counts ULPs of the run's dtype (bfloat16 included)."""
    precision, min_exponent = _format(dtype)
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    _, e = np.frexp(magnitude)  # |x| = m 2**e with m in [0.5, 1)
    exponent = np.where(magnitude > 0, np.maximum(e - 1, min_exponent), min_exponent)
    return np.ldexp(1.0, exponent - precision + 1)


def _format(dtype) -> tuple[int, int]:
    """(bits of the significand, the implicit one included; smallest normal exponent)."""
    if dtype == "bfloat16":
        return 8, -126
    info = np.finfo(dtype)
    return info.nmant + 1, info.minexp


def kappa(rule: str, hyper: dict, t: int, n: int) -> float:
    """The relative error, in eps, of step ``t``'s update of a tensor of ``n`` entries."""
    declared = mvn_core.rules[rule]
    memory = sum(min(t, 1.0 / (1.0 - hyper[name])) for name in declared.memories)
    own = oracle.ENTRIES[rule].rounding
    return (OPS + memory + (reduction(n) if _reduces(declared) else 0.0)
            + (own(hyper, t) if own is not None else 0.0))


def _reduces(rule: mvn_core.Rule) -> bool:
    """Whether the rule's step takes a reduction over the tensor (a statistic)."""
    return rule.tensor_rule is not None and rule.tensor_rule.statistic is not None


def reduction(n: int) -> float:
    return math.log2(max(n, 1)) + 1.0


def trajectory_bounds(rule: str, hyper: dict, dtype, params0, reference, *,
                      other_dtype="float64", extra_kappa=None, grads=None) -> list:
    """Per step and tensor, the largest allowed ``|theta - theta*|`` (arrays like theta).

    ``other_dtype`` is the dtype the reference rounds in (the float64 oracle; a peer
    rounds in the run's dtype), ``extra_kappa(t)`` what the reference adds to step
    ``t``'s relative error, in eps (e.g. a peer's bias correction ``1 - b**t``).
    ``grads`` (per step, the tensors' gradients) lets a rule whose update jumps
    (``Entry.switches``) allow the jump where it may fall either way.
    """
    eps = machine_eps(dtype) + machine_eps(other_dtype)  # the run's rounding and the reference's
    previous = [np.asarray(p, dtype=np.float64) for p in params0]
    accumulated = [np.zeros_like(p) for p in previous]
    jumps = _switches(rule, hyper, grads)
    jumped = [np.zeros_like(p) for p in previous]
    bounds = []
    for t, thetas in enumerate(reference, start=1):
        for i, theta in enumerate(thetas):
            k = kappa(rule, hyper, t, theta.size) + (extra_kappa(t) if extra_kappa else 0.0)
            accumulated[i] = accumulated[i] + k * np.abs(theta - previous[i]) + np.abs(theta)
            if jumps is not None:
                jumped[i] = jumped[i] + _undecided_jump(jumps[t - 1][i], k * eps)
        previous = thetas
        bounds.append([eps * a + j for a, j in zip(accumulated, jumped)])
    return bounds


def _switches(rule: str, hyper: dict, grads) -> list | None:
    switches = oracle.ENTRIES[rule].switches
    if switches is None:
        return None
    if grads is None:
        raise ValueError(f"{rule}'s bounds need the gradients: its update jumps")
    return switches(grads, hyper)


def _undecided_jump(switch: oracle.Switch, relative_error: float) -> np.ndarray:
    """The jump, where the value that decides it lies within its rounding of zero: a
    run may then take the other side, and keeps the difference (a sign's jump is not
    undone by later steps)."""
    undecided = np.abs(switch.value) <= relative_error * switch.scale
    return np.where(undecided, switch.jump, 0.0)


def gan_bounds(dtype, grads, reference, alpha) -> list:
    """For one step of GAN, the largest allowed ``|out - out*|`` per tensor.

    Centring cancels: its error is eps relative to the *input*, ``alpha * max|g|``;
    the global scale adds the reduction's error relative to the output.
    """
    eps = machine_eps(dtype) + machine_eps("float64")
    n = sum(g.size for g in grads if np.ndim(g) >= 2)
    k = OPS + reduction(n)
    out = []
    for g, ref in zip(grads, reference):
        if np.ndim(g) < 2 or alpha is None:
            out.append(np.zeros_like(ref))  # passed through: must be exact
        else:
            largest = float(np.max(np.abs(g))) if np.size(g) else 0.0
            out.append(eps * k * (np.abs(ref) + alpha * largest))
    return out
