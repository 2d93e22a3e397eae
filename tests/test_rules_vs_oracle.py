"""Every rule, on every backend, against the independent float64 oracle.

100 steps of gradients over 0-d, empty, 1-d, 2-d and 4-d tensors, with the settings
of :mod:`mvn_core.conformance.cases` (defaults, weight decay and each rule's main
option).  Every coordinate at every step must stay within the rounding bound of
:mod:`mvn_core.conformance.tolerance`; float64 must moreover agree to 1e-12 relative
(norm-wise per tensor, at every step).
"""

from __future__ import annotations

import functools

import pytest

from mvn_core.conformance import oracle
from mvn_core.conformance.cases import cases
from mvn_core.conformance.comparison import compare, reference_bounds
from mvn_core.conformance.problems import make_problem, rounded
from mvn_core.conformance.trajectories import core_trajectory

STEPS = 100
DTYPES = ("float16", "bfloat16", "float32", "float64")


@functools.lru_cache(maxsize=None)
def _problem(dtype):
    return rounded(make_problem(STEPS, seed=20261123), dtype)


@functools.lru_cache(maxsize=None)
def _reference(rule, hyper_items, dtype):
    problem = _problem(dtype)
    return oracle.trajectory(rule, problem.params, problem.grads, **dict(hyper_items))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in cases()])
def test_rule_matches_oracle(target, dtype, case):
    rule, hyper = case.rule, case.hyper
    problem = _problem(dtype)
    reference = _reference(rule, tuple(sorted(hyper.items())), dtype)
    got = core_trajectory(rule, target.backend, problem, dtype=dtype, device=target.device,
                          compiled=target.compiled, **hyper)
    result = compare(got, reference, reference_bounds(rule, hyper, dtype, problem, reference),
                     dtype)
    assert result.passed, result.message
    if dtype == "float64":
        assert result.max_rel_error <= 1e-12, f"relative error {result.max_rel_error:.3g}"
