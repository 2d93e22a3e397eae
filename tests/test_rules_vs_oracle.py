"""Every rule, on every backend, against the independent float64 oracle.

100 steps of gradients over 0-d, empty, 1-d, 2-d and 4-d tensors, with and without
weight decay.  Every coordinate at every step must stay within the rounding bound of
:mod:`mvn_core.conformance.tolerance`; float64 must moreover agree to 1e-12 relative
(norm-wise per tensor, at every step).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from mvn_core.conformance import oracle
from mvn_core.conformance.problems import make_problem, rounded
from mvn_core.conformance.tolerance import gan_bounds, trajectory_bounds
from mvn_core.conformance.trajectories import core_trajectory

STEPS = 100
WD = 0.1
DTYPES = ("float16", "bfloat16", "float32", "float64")
CASES = {
    "mvn": [{}, {"weight_decay": WD}, {"weight_decay": WD, "coupled_weight_decay": True}],
    "adam": [{}, {"weight_decay": WD}, {"weight_decay": WD, "coupled_weight_decay": True}],
    "adabelief": [{}, {"weight_decay": WD}, {"weight_decay": WD, "rectify": True}],
    "laprop": [{}, {"weight_decay": WD}],
    "maxva": [{}, {"weight_decay": WD}, {"b2_min": 0.9, "b2_max": 0.99}],
    "novograd": [{}, {"weight_decay": WD}, {"weight_decay": WD, "grad_averaging": True}],
    "sgd": [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": WD},
            {"momentum": 0.9, "weight_decay": WD, "coupled_weight_decay": True}],
    "gan": [{}, {"center": "channel"}, {"scale": "none"}],
}
LR = {"laprop": 4e-3, "gan": None}  # others: 1e-2, so that 100 steps move the params


def _cases():
    for rule, variants in CASES.items():
        for hyper in variants:
            lr = LR.get(rule, 1e-2)
            full = dict(hyper) if lr is None else dict(hyper, lr=lr)
            label = ",".join(f"{k}={v}" for k, v in hyper.items()) or "defaults"
            yield pytest.param(rule, full, id=f"{rule}[{label}]")


@functools.lru_cache(maxsize=None)
def _problem(dtype):
    return rounded(make_problem(STEPS, seed=20261123), dtype)


@functools.lru_cache(maxsize=None)
def _reference(rule, hyper_items, dtype):
    problem = _problem(dtype)
    return oracle.trajectory(rule, problem.params, problem.grads, **dict(hyper_items))


@pytest.mark.parametrize("rule,hyper", list(_cases()))
def test_rule_matches_oracle(target, dtype, rule, hyper):
    problem = _problem(dtype)
    reference = _reference(rule, tuple(sorted(hyper.items())), dtype)
    got = core_trajectory(rule, target.backend, problem, dtype=dtype, device=target.device,
                          compiled=target.compiled, **hyper)
    assert len(got) == STEPS
    if dtype == "float64":
        _assert_relative(got, reference, 1e-12)
    if rule == "gan":
        bounds = [gan_bounds(dtype, grads, ref, oracle.gan_with_scale(grads, **hyper)[1])
                  for grads, ref in zip(problem.grads, reference)]
        _assert_within(got, reference, bounds)
    else:
        _assert_within(got, reference, trajectory_bounds(
            rule, dict(oracle.DEFAULTS[rule], **hyper), dtype, problem.params, reference))


def _assert_relative(got, reference, rtol):
    for t, (xs, refs) in enumerate(zip(got, reference), start=1):
        for i, (x, ref) in enumerate(zip(xs, refs)):
            assert x.shape == ref.shape, f"step {t}, tensor {i}: shape {x.shape} != {ref.shape}"
            if ref.size == 0:
                continue
            scale = max(float(np.max(np.abs(ref))), np.finfo(np.float64).tiny)
            error = float(np.max(np.abs(x - ref))) / scale
            assert error <= rtol, f"step {t}, tensor {i}: relative error {error:.3g} > {rtol:g}"


def _assert_within(got, reference, bounds):
    for t, (xs, refs, bs) in enumerate(zip(got, reference, bounds), start=1):
        for i, (x, ref, bound) in enumerate(zip(xs, refs, bs)):
            assert x.shape == ref.shape, f"step {t}, tensor {i}: shape {x.shape} != {ref.shape}"
            error = np.abs(x.astype(np.float64) - ref)
            worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else ()
            assert np.all(error <= bound), (
                f"step {t}, tensor {i}: error {float(error[worst]):.3g} exceeds the rounding "
                f"bound {float(bound[worst]):.3g} at {worst}")
