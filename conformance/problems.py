"""Reproducible test problems: initial parameters and a sequence of gradients."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mvn_core.backends.numpy import round_to

# 0-d, empty (1-d and 2-d), 1-d, 2-d and 4-d tensors: every rule must take all of them.
SHAPES = ((), (0,), (0, 3), (7,), (5, 4), (2, 3, 2, 3))


class Problem(NamedTuple):
    params: list  # float64 arrays
    grads: list  # per step, a list of float64 arrays (one per tensor)


def make_problem(steps: int = 100, seed: int = 0, shapes=SHAPES) -> Problem:
    """Parameters ~ N(0, 1); gradients = a fixed per-coordinate signal + fresh noise,
    each tensor at its own scale (from 0.01 to 10), so that per-tensor statistics and
    the cancellation in ``g - m`` are exercised.  The signal (0.5) is smaller than the
    noise (1): the problem is well conditioned, as :mod:`.tolerance` assumes."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(shape) for shape in shapes]
    scales = 10.0 ** rng.uniform(-2, 1, size=len(shapes))
    signals = [0.5 * rng.standard_normal(shape) for shape in shapes]
    grads = [[scale * (signal + rng.standard_normal(signal.shape))
              for scale, signal in zip(scales, signals)] for _ in range(steps)]
    return Problem(params, grads)


def rounded(problem: Problem, dtype) -> Problem:
    """The problem with every value rounded to ``dtype`` (a name; bfloat16 included) and
    held in float64 again, so that the float64 oracle sees exactly the inputs a
    lower-precision run sees (the values convert exactly into ``dtype``)."""
    def r(a):
        return round_to(a, dtype).astype(np.float64)
    return Problem([r(p) for p in problem.params], [[r(g) for g in gs] for gs in problem.grads])


# The dtypes a portable problem is exact in.
PORTABLE_DTYPES = ("float16", "bfloat16", "float32", "float64")


def portable(problem: Problem) -> Problem:
    """The problem with every value exactly representable in float16, bfloat16, float32
    and float64 (held in float64), so that one float64 reference serves runs in every
    dtype, and stored golden trajectories need one file per setting, not per dtype.

    Rounding to bfloat16 (8 significant bits) and then to float16 (whose subnormal
    spacing 2**-24 only removes bits) gives values with at most 8 significant bits in
    float16's range: both conversions are then exact.  Values below float16's
    subnormals become zero, which the rules take like any other gradient.
    """
    return rounded(rounded(problem, "bfloat16"), "float16")
