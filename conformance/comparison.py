"""A run's trajectory against a float64 reference: within the rounding bound, and by how much.

Three numbers describe a comparison, each the largest over every step, tensor and
coordinate of the run:

- ``bound_used``: the error divided by the bound of :mod:`.tolerance` at that
  coordinate; the run passes when it is at most 1 everywhere.  A bound of zero (GAN's
  pass-through tensors) allows no error at all;
- ``max_rel_error``: per step and tensor, ``max|x - x*| / max|x*|`` (norm-wise), the
  unit in which float64 is held to 1e-12 and peers are compared;
- ``max_ulps``: ``|x - x*|`` divided by the spacing of the run's dtype at ``|x*|``
  (:func:`.tolerance.spacing`), coordinate by coordinate.  Coordinates close to zero
  count many ULPs for errors that are rounding of their tensor's larger entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import oracle
from .tolerance import gan_bounds, spacing, trajectory_bounds


@dataclass(frozen=True)
class Comparison:
    """The outcome of one run against its reference (see the module's docstring).

    ``step`` (from 1), ``tensor`` and ``index`` locate the coordinate that used most of
    its bound, with its ``error`` and ``bound``; ``problem`` describes what made the
    run incomparable (a wrong number of steps or shape), if anything did.
    """

    passed: bool
    bound_used: float
    max_rel_error: float
    max_ulps: float
    step: int = 0
    tensor: int = 0
    index: tuple = ()
    error: float = 0.0
    bound: float = 0.0
    problem: str = ""

    @property
    def message(self) -> str:
        if self.problem:
            return self.problem
        return (f"step {self.step}, tensor {self.tensor}: error {self.error:.3g} "
                f"{'within' if self.passed else 'exceeds'} the rounding bound "
                f"{self.bound:.3g} at {self.index}")


def reference_bounds(rule: str, hyper: dict, dtype: str, problem, reference, alphas=None) -> list:
    """Per step and tensor, the largest allowed ``|x - x*|`` of a run in ``dtype``.

    For a transform (GAN) ``alphas`` are the oracle's global factors per step (computed
    here when not given); the other rules need the problem's initial parameters and the
    reference.
    """
    if oracle.ENTRIES[rule].transform is not None:
        if alphas is None:
            alphas = [oracle.transformed(rule, grads, **hyper)[1] for grads in problem.grads]
        return [gan_bounds(dtype, grads, ref, alpha)
                for grads, ref, alpha in zip(problem.grads, reference, alphas)]
    full = dict(oracle.DEFAULTS[rule], **hyper)
    return trajectory_bounds(rule, full, dtype, problem.params, reference, grads=problem.grads)


def compare(got, reference, bounds, dtype: str) -> Comparison:
    """``got`` (per step, NumPy arrays) against ``reference`` within ``bounds``."""
    if len(got) != len(reference):
        return _incomparable(f"{len(got)} steps, the reference has {len(reference)}")
    worst, largest_rel, largest_ulps = None, 0.0, 0.0
    for t, (xs, refs, bs) in enumerate(zip(got, reference, bounds), start=1):
        if len(xs) != len(refs):
            return _incomparable(f"step {t}: {len(xs)} tensors, the reference has {len(refs)}")
        for i, (x, ref, bound) in enumerate(zip(xs, refs, bs)):
            if np.shape(x) != np.shape(ref):
                return _incomparable(f"step {t}, tensor {i}: shape {np.shape(x)} != {np.shape(ref)}")
            error = _error(x, ref)
            if error.size == 0:
                continue
            used = _fraction(error, bound)
            place = np.unravel_index(np.argmax(used), used.shape)
            if worst is None or used[place] > worst[0]:
                worst = (float(used[place]), t, i, tuple(int(k) for k in place),
                         float(error[place]), float(np.broadcast_to(bound, error.shape)[place]))
            largest_rel = max(largest_rel, relative_error(error, ref))
            largest_ulps = max(largest_ulps, float(np.max(error / spacing(dtype, ref))))
    if worst is None:  # nothing but empty tensors
        return Comparison(True, 0.0, 0.0, 0.0)
    used, t, i, index, error, bound = worst
    return Comparison(used <= 1.0, used, largest_rel, largest_ulps, t, i, index, error, bound)


def relative_difference(got, other) -> float:
    """The largest norm-wise relative difference of two runs, per step and tensor, as
    ``max_rel_error`` measures it (0.0: the same values); inf where they cannot be
    compared."""
    if len(got) != len(other):
        return float("inf")
    largest = 0.0
    for xs, ys in zip(got, other):
        for x, y in zip(xs, ys):
            if np.shape(x) != np.shape(y):
                return float("inf")
            if np.size(x):
                largest = max(largest, relative_error(_error(x, y), y))
    return largest


def relative_error(error, reference) -> float:
    """``max|x - x*| / max|x*|`` of one tensor, from ``error = |x - x*|``."""
    scale = max(float(np.max(np.abs(reference))), np.finfo(np.float64).tiny)
    return float(np.max(error)) / scale


def _error(x, ref) -> np.ndarray:
    """``|x - x*|`` in float64, with a NaN or an infinity counted as an infinite error."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, counted as inf
        error = np.abs(np.asarray(x, dtype=np.float64) - ref)
    return np.where(np.isfinite(error), error, np.inf)


def _fraction(error, bound) -> np.ndarray:
    bound = np.broadcast_to(bound, error.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        used = error / bound
    return np.where(error == 0, 0.0, np.where(bound > 0, used, np.inf))


def _incomparable(problem: str) -> Comparison:
    inf = float("inf")
    return Comparison(False, inf, inf, inf, problem=problem)
