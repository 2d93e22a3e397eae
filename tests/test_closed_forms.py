"""Closed forms and exact relations of docs/algorithms.md, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import mvn_core
from mvn_core import backends
from mvn_core.conformance import oracle
from mvn_core.conformance.problems import make_problem
from mvn_core.conformance.trajectories import core_trajectory

LR = 1e-2


def _first_update(target, dtype, rule, g, **hyper):
    lib = backends.get(target.backend)
    grads = [lib.from_numpy(a, device=target.device, dtype=dtype) for a in g]
    rule = mvn_core.rules[rule]

    def first(state, grads):
        return rule.update(state, grads, lr=LR, **hyper)[0]

    updates = (lib.compile(first) if target.compiled else first)(rule.init(grads), grads)
    return [lib.to_numpy(u).astype(np.float64) for u in updates]


def _gradients(dtype):
    """Gradients of size 0.1 .. 10 (so that eps is negligible), with both signs."""
    rng = np.random.default_rng(7)
    shapes = [(5, 3), (11,), ()]
    out = [rng.choice([-1.0, 1.0], size=s) * 10.0 ** rng.uniform(-1, 1, size=s) for s in shapes]
    return [np.asarray(a, dtype=dtype) for a in out]


def _rtol(dtype):
    return 1e-6 if dtype == "float64" else 1e-5  # eps / |g| is at most 1e-7


def _settings(name):
    """The rule's checked settings without weight decay (it would enter the first step)."""
    out = []
    for setting in mvn_core.rules[name].settings or ({},):
        setting = {k: v for k, v in setting.items() if k not in ("weight_decay", "lr")}
        if setting not in out:
            out.append(setting)
    return out


CLOSED_FORMS = [(name, setting) for name in mvn_core.rules
                if oracle.ENTRIES[name].first_direction for setting in _settings(name)]


@pytest.mark.parametrize("name,setting", CLOSED_FORMS,
                         ids=[f"{n}{s}" for n, s in CLOSED_FORMS])
def test_first_step_is_its_closed_form(target, dtype, name, setting):
    """E.g. MVN-Grad's ``-lr sign(g) / b1``, Adam's ``-lr sign(g)``, NovoGrad's
    ``-lr g / |g|``, as each rule's oracle entry writes it (from docs/algorithms.md)."""
    entry = oracle.ENTRIES[name]
    h = dict(entry.defaults, **setting)
    g = _gradients(dtype)
    for u, gi in zip(_first_update(target, dtype, name, g, **setting), g):
        expected = -LR * entry.first_direction(gi.astype(np.float64), h)
        np.testing.assert_allclose(u, expected, rtol=_rtol(dtype) * entry.first_direction_error(h))


def test_maxva_with_one_beta_is_adam(target, dtype):
    problem = make_problem(60, seed=3)
    where = dict(dtype=dtype, device=target.device, compiled=target.compiled)
    adam = core_trajectory("adam", target.backend, problem, lr=LR, b2=0.99, weight_decay=0.1,
                           **where)
    maxva = core_trajectory("maxva", target.backend, problem, lr=LR, b2_min=0.99, b2_max=0.99,
                            weight_decay=0.1, **where)
    # Same mathematics, different rounding (w_t by recursion, 1 - b2^t by expm1).
    rtol = 1e-12 if dtype == "float64" else 1e-5
    for step_a, step_m in zip(adam, maxva):
        for a, m in zip(step_a, step_m):
            np.testing.assert_allclose(m, a, rtol=rtol, atol=rtol * np.max(np.abs(a), initial=0))


def test_mvn_variance_is_adabelief_second_moment(target, dtype):
    """MVN-Grad's v_t and AdaBelief's s_t are the same average (eps_s = eps)."""
    lib = backends.get(target.backend)
    problem = make_problem(30, seed=5)

    def convert(arrays):
        return [lib.from_numpy(a, device=target.device, dtype=dtype) for a in arrays]

    mvn_state = mvn_core.mvn_init(convert(problem.params))
    belief_state = mvn_core.adabelief_init(convert(problem.params))
    for grads in problem.grads:
        grads = convert(grads)
        _, mvn_state = mvn_core.mvn_update(mvn_state, grads, b1=0.8, b2=0.95, eps_s=1e-12)
        _, belief_state = mvn_core.adabelief_update(belief_state, grads, b1=0.8, b2=0.95,
                                                    eps=1e-12)
    for v, s in zip(mvn_state.v, belief_state.s):
        np.testing.assert_array_equal(lib.to_numpy(v), lib.to_numpy(s))
