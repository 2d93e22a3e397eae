"""The rules against their peers (torch.optim, optax, timm, adabelief-pytorch).

Each check is skipped, with the reason, where its peer is not installed (they are all
in the ``test`` extra).  "To rounding" is the worst-case model of
:mod:`mvn_core.conformance.peers`; the tests also show that the comparison is sharp
enough to catch a wrong configuration.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import mvn_core
from mvn_core.conformance import oracle, peers
from mvn_core.conformance.oracle.mvn import as_laprop
from mvn_core.conformance.problems import make_problem

# The model's tolerances are a few hundred eps at most over 100 steps: "to rounding".
LOOSEST = {"float64": 1e-13, "float32": 2e-5}


def _check_params():
    for check, reason in peers.peers():
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        yield pytest.param(check, id=f"{check.label}-vs-{check.peer}", marks=marks)


@pytest.mark.parametrize("dtype", peers.DTYPES)
@pytest.mark.parametrize("check", list(_check_params()))
def test_rule_agrees_with_peer_to_rounding(check, dtype):
    result = peers.run_check(check, dtype)
    assert result.skipped is None
    assert result.passed, (f"{check.label} vs {check.peer} ({dtype}): relative error "
                           f"{result.max_error:.3g} > {result.tolerance:.3g} at {result.where}")
    assert result.max_error <= result.tolerance <= LOOSEST[dtype]
    assert result.largest < 10 * LOOSEST[dtype]


def _only(peer):
    (check,) = [c for c in peers.CHECKS if c.peer == peer]
    if check.unavailable_reason():
        pytest.skip(check.unavailable_reason())
    return check


def _misconfigured(check, **peer_hyper):
    """``check`` with the peer given other hyperparameters than the core."""
    def run(problem, dtype, h):
        return check.run_peer(problem, dtype, dict(h, **peer_hyper))
    return dataclasses.replace(check, run_peer=run)


@pytest.mark.parametrize("dtype,eps", [("float64", 1e-7), ("float32", 1e-5)])
def test_a_wrong_eps_is_caught(dtype, eps):
    """Adam's eps at ``eps`` instead of 1e-8 changes its direction by about ``eps / sqrt(v)``
    relative, 1e-6 (float64) and 1e-4 (float32) on the problem's smallest gradients:
    enough for float64, where the tolerance is ~1e-14, and for float32 (~1e-6)."""
    check = _misconfigured(_only("torch.optim.Adam"), eps=eps)
    result = peers.run_check(check, dtype)
    assert not result.passed and result.max_error > 3 * result.tolerance


@pytest.mark.parametrize("dtype", peers.DTYPES)
def test_decoupled_is_not_coupled_weight_decay(dtype):
    adamw = _only("torch.optim.AdamW")
    coupled = dataclasses.replace(adamw, hyper=dict(adamw.hyper, coupled_weight_decay=True))
    assert not peers.run_check(coupled, dtype).passed


def test_mvn_is_laprop_only_with_the_crafted_mean():
    check = _only("timm LaProp (MVN-Grad with (g-m)^2 -> g^2, eps_s=0)")
    assert peers.run_check(check, "float64").passed
    plain = dataclasses.replace(check, run_core=None)  # MVN-Grad as it is: (g - m)^2
    assert not peers.run_check(plain, "float64").passed


def test_mvn_variance_needs_eps_root_equal_to_eps_s():
    check = _only("optax.scale_by_belief(eps=0, eps_root=eps_s): nu")
    assert not peers.run_check(_misconfigured(check, eps_s=0.0), "float64").passed


def test_crafted_mean_makes_mvn_exactly_laprop():
    """With b1 = 0.5 the crafted mean ``m = -g`` gives ``m_t = 0`` exactly, and MVN-Grad's
    steps are bit for bit LaProp's (eps_s = 0, same eps): the reduction of docs/algorithms.md."""
    problem = make_problem(40, seed=11)
    hyper = dict(lr=1e-2, b1=0.5, b2=0.99, eps=1e-12)
    for dtype in ("float64", "float32"):
        ours = as_laprop(mvn_core, problem, dtype, eps_s=0.0, **hyper)
        params = [np.asarray(p, dtype=dtype) for p in problem.params]
        state = mvn_core.laprop_init(params)
        for step, grads in zip(ours, problem.grads):
            updates, state = mvn_core.laprop_update(
                state, [np.asarray(g, dtype=dtype) for g in grads], **hyper)
            params = mvn_core.apply_updates(params, updates)
            for x, y in zip(step, params):
                np.testing.assert_array_equal(x, y)


def test_every_rule_has_an_oracle_entry_with_its_peers():
    """A registered rule without an entry would have no reference: the check fails."""
    assert set(oracle.ENTRIES) == set(mvn_core.rules)
    assert {c.rule for c in peers.CHECKS} == {
        name for name, entry in oracle.ENTRIES.items() if entry.peers}


def test_every_relation_of_the_issue_has_a_check():
    pairs = {(c.rule, c.peer.split("(")[0].split(":")[0].strip()) for c in peers.CHECKS}
    for expected in [("adam", "torch.optim.Adam"), ("adam", "torch.optim.AdamW"),
                     ("sgd", "torch.optim.SGD"), ("adam", "optax.adam"), ("adam", "optax.adamw"),
                     ("novograd", "optax.novograd"), ("sgd", "optax.sgd"),
                     ("adabelief", "optax.scale_by_belief + add_decayed_weights"),
                     ("laprop", "timm LaProp"), ("novograd", "timm NvNovoGrad"),
                     ("adabelief", "timm AdaBelief"), ("adabelief", "adabelief_pytorch.AdaBelief"),
                     ("maxva", "torch.optim.AdamW"), ("mvn", "optax.scale_by_belief"),
                     ("mvn", "timm AdaBelief"), ("mvn", "adabelief_pytorch.AdaBelief"),
                     ("mvn", "timm LaProp")]:
        assert expected in pairs


def test_report_lists_every_result():
    check = _only("torch.optim.SGD")
    results = peers.run_peer_checks(checks=[check], steps=5)
    lines = peers.report_lines(results)
    assert len(lines) == 2 + len(peers.DTYPES)
    assert all(" pass" in line for line in lines[2:])


def test_checks_print_nothing(capsys):
    """adabelief-pytorch prints its settings on construction; a report must stay clean."""
    peers.run_check(_only("adabelief_pytorch.AdaBelief(rectify)"), "float32", steps=3)
    assert capsys.readouterr().out == ""


_PEER_MODULES = ("torch", "jax", "optax", "timm", "torchvision", "adabelief_pytorch")


def _loaded_after(code):
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(sorted(m for m in "
                          f"{_PEER_MODULES!r} if m in sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def test_importing_the_checks_imports_no_peer():
    assert _loaded_after("import mvn_core.conformance.peers as p; p.peers()") == "[]"


def test_timm_optimizers_load_without_timm_or_torchvision():
    _only("timm LaProp")
    code = ("from mvn_core.conformance import peers\n"
            "for name in ('laprop', 'nvnovograd', 'adabelief'):\n"
            "    peers.timm_optim(name)\n")
    assert _loaded_after(code) == "['torch']"
