"""Cross-checks of the rules against independent implementations of the same mathematics.

Each :class:`PeerCheck` runs a rule of the core (the pure functions, on NumPy) and a
peer (``torch.optim``, optax, timm, ``adabelief-pytorch``), configured as docs/algorithms.md
lists, on the same :mod:`.problems` problem: every peer of every rule's oracle entry
(:class:`.oracle.Peer`), and compares the parameters after every
step (or, for the relations of MVN-Grad, a state buffer).  A peer's library is imported
only when its check runs, never when this module is imported.

How close is "to rounding"?  Both sides round, so the allowed distance is the
worst-case model of :mod:`.tolerance` with the rounding counted twice (the core's and
the peer's, each in the run's dtype), plus what the peers do differently on purpose:
they compute the bias corrections as ``1 - b**t`` (or by a recursion), whose relative
error is ``eps / (1 - b**t)`` (up to ``1000 eps`` at step 1 for ``b2 = 0.999``) where the
core's ``-expm1(t log b)`` has a few ulp.  Most peers compute those scalars in double,
which makes the term negligible in float32 runs and dominant in the first float64 steps;
timm's LaProp keeps them in torch's default dtype, which a run sets to its own dtype.

The error of a run is the relative error norm-wise per tensor, step by step
(``max|theta - theta_core| / max|theta_core|``), and its tolerance the model's bound on
it at the same step and tensor.  A result reports the step and tensor where the error
comes closest to its tolerance, so ``passed`` is ``max_error <= tolerance``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import mvn_core

from . import oracle
from .problems import Problem, make_problem, rounded
from .tolerance import kappa, machine_eps, trajectory_bounds
from .trajectories import core_trajectory

STEPS = 100
SEED = 20261123
DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class PeerCheck:
    """One comparison: ``rule`` with ``hyper`` against ``peer``.

    ``run_peer(problem, dtype, h)`` returns, per step, the peer's parameters (or the
    state buffer named by ``state``) as NumPy arrays; ``h`` is the rule's defaults
    updated with ``hyper``.  ``run_core`` replaces the plain core trajectory where the
    relation needs crafted inputs.  ``bias_corrected`` names the betas the peer
    bias-corrects itself, and ``scalars_in_run_dtype`` says that it keeps those scalars
    in the run's dtype rather than in double (timm's LaProp).
    """

    rule: str
    peer: str
    hyper: dict
    run_peer: Callable
    requires: tuple
    state: str | None = None
    run_core: Callable | None = None
    bias_corrected: tuple = ()
    scalars_in_run_dtype: bool = False
    model_rule: str | None = None  # the rule whose rounding model applies, if not ``rule``
    note: str = ""

    @property
    def full_hyper(self) -> dict:
        return dict(mvn_core.rules[self.rule].defaults, **self.hyper)

    @property
    def label(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.hyper.items())
        return f"{self.rule}({settings})"

    def unavailable_reason(self) -> str | None:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed (pip install 'mvn-core[test]')"
        return None


@dataclass(frozen=True)
class PeerResult:
    """The outcome of one check in one dtype (``skipped`` holds why it did not run)."""

    rule: str
    peer: str
    dtype: str
    max_error: float
    tolerance: float
    passed: bool
    where: str = ""  # the step and tensor of max_error
    largest: float = float("nan")  # the largest relative error anywhere in the run
    skipped: str | None = None
    label: str = field(default="", compare=False)


# --- the peers, imported only here -----------------------------------------------------

def _torch():
    import torch

    return torch


@contextlib.contextmanager
def _torch_default_dtype(dtype: str):
    """Some peers create scalars in torch's default dtype (timm's LaProp bias correction,
    NvNovoGrad's second moment): a float64 run makes that float64 too."""
    torch = _torch()
    before = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _run_torch(make, problem: Problem, dtype: str, h: dict, state: str | None = None) -> list:
    """Drive a ``torch.optim.Optimizer`` made by ``make(params, h)`` over ``problem``.

    Each step gets fresh gradient tensors, so a peer that writes into ``p.grad``
    (NvNovoGrad did in older timm) cannot alter the problem.
    """
    torch = _torch()
    with _torch_default_dtype(dtype):
        params = [torch.tensor(p, dtype=getattr(torch, dtype)) for p in problem.params]
        optimizer = make(params, h)
        out = []
        for grads in problem.grads:
            for p, g in zip(params, grads):
                p.grad = torch.tensor(g, dtype=p.dtype)
            optimizer.step()
            values = [optimizer.state[p][state] if state else p for p in params]
            out.append([v.detach().cpu().numpy().astype(np.float64) for v in values])
    return out


def _jax():
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 runs need it; float32 stays float32
    return jax


def _run_optax(make, problem: Problem, dtype: str, h: dict, state: str | None = None) -> list:
    """Drive the ``optax.GradientTransformation`` made by ``make(optax, h)`` under ``jax.jit``."""
    jax = _jax()
    import optax

    tx = make(optax, h)

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def convert(arrays):
        return [jax.numpy.asarray(a, dtype=dtype) for a in arrays]

    params = convert(problem.params)
    opt_state = tx.init(params)
    out = []
    for grads in problem.grads:
        params, opt_state = step(params, opt_state, convert(grads))
        values = getattr(opt_state, state) if state else params
        out.append([np.asarray(v, dtype=np.float64) for v in values])
    return out


_TIMM_ALIAS = "_mvn_core_peer_timm_optim"


def timm_optim(module: str) -> types.ModuleType:
    """A module of ``timm.optim`` (e.g. ``"laprop"``), loaded without running timm's
    package ``__init__``, which imports torchvision (and fails where torchvision's
    compiled operators do not match the installed torch).

    The files are loaded as submodules of a private stub package whose path is timm's
    ``optim`` folder, so their relative imports (``._helpers``) resolve there, and
    neither ``timm`` nor ``torchvision`` enters ``sys.modules``.
    """
    if _TIMM_ALIAS not in sys.modules:
        spec = importlib.util.find_spec("timm")  # locates the package; runs nothing
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("timm is not installed")
        stub = types.ModuleType(_TIMM_ALIAS)
        stub.__path__ = [f"{spec.submodule_search_locations[0]}/optim"]
        sys.modules[_TIMM_ALIAS] = stub
    return importlib.import_module(f"{_TIMM_ALIAS}.{module}")


# --- the core side ------------------------------------------------------------------

def _core_params(check: PeerCheck, problem: Problem, dtype: str) -> list:
    return core_trajectory(check.rule, "numpy", problem, dtype=dtype, **check.hyper)


def _core_state(check: PeerCheck, problem: Problem, dtype: str) -> list:
    """The core's state buffer ``check.state`` after every step (e.g. ``mvn``'s ``v``)."""
    rule = mvn_core.rules[check.rule]
    params = [np.asarray(p, dtype=dtype) for p in problem.params]
    state = rule.init(params)
    out = []
    for grads in problem.grads:
        _, state = rule.update(state, [np.asarray(g, dtype=dtype) for g in grads], params,
                               **check.hyper)
        out.append([np.asarray(b, dtype=np.float64) for b in getattr(state, check.state)])
    return out


# --- the table of checks: the peers of every rule's oracle entry ----------------------

def _check(rule_name: str, peer: oracle.Peer) -> PeerCheck:
    ours, theirs = peer.state or (None, None)
    run = _run_torch if peer.library == "torch" else _run_optax
    return PeerCheck(
        rule_name, peer.name, dict(peer.hyper), functools.partial(run, peer.make, state=theirs),
        peer.requires, state=ours,
        run_core=None if peer.core is None else functools.partial(peer.core, mvn_core),
        bias_corrected=peer.bias_corrected, scalars_in_run_dtype=peer.scalars_in_run_dtype,
        model_rule=peer.model_rule, note=peer.note)


CHECKS: tuple[PeerCheck, ...] = tuple(_check(name, peer) for name in mvn_core.rules
                                      for peer in oracle.ENTRIES[name].peers)


def peers() -> list[tuple[PeerCheck, str | None]]:
    """Every check, with None or the reason it cannot run here (a peer not installed)."""
    return [(check, check.unavailable_reason()) for check in CHECKS]


# --- running and judging ------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def peer_problem(dtype: str, steps: int = STEPS, seed: int = SEED) -> Problem:
    """The problem every check runs: ``make_problem`` rounded to ``dtype``."""
    return rounded(make_problem(steps, seed=seed), dtype)


def run_check(check: PeerCheck, dtype: str, steps: int = STEPS, seed: int = SEED) -> PeerResult:
    """Run one check in one dtype and judge it (a skipped result if the peer is missing)."""
    reason = check.unavailable_reason()
    if reason is not None:
        return PeerResult(check.rule, check.peer, dtype, float("nan"), float("nan"), False,
                          skipped=reason, label=check.label)
    problem = peer_problem(dtype, steps, seed)
    h = check.full_hyper
    theirs = check.run_peer(problem, dtype, h)
    if check.state is not None:
        ours = _core_state(check, problem, dtype)
        errors, tolerances = _state_errors(check, dtype, ours, theirs)
    else:
        ours = (check.run_core(problem, dtype, **check.hyper) if check.run_core
                else _core_params(check, problem, dtype))
        errors, tolerances = _param_errors(check, dtype, problem, ours, theirs)
    return _judge(check, dtype, errors, tolerances)


def run_peer_checks(dtypes=DTYPES, steps: int = STEPS, seed: int = SEED,
                    checks=None) -> list[PeerResult]:
    """Every check (or ``checks``) in every dtype, as records for a report."""
    return [run_check(check, dtype, steps, seed)
            for check in (CHECKS if checks is None else checks) for dtype in dtypes]


def _peer_kappa(check: PeerCheck, dtype: str, h: dict) -> Callable[[int], float]:
    """What the peer's own bias corrections add to step ``t``'s relative error, in eps.

    ``1 - b**t`` in a dtype with epsilon ``e`` is off by ``e b^t / (1 - b^t)`` relative;
    a recursion ``x = b x + (1 - b)`` by at most ``2 e`` per step it remembers.  Both are
    counted, in the dtype the peer computes them in (double, or the run's dtype).
    """
    scale = 1.0 if check.scalars_in_run_dtype else machine_eps("float64") / machine_eps(dtype)
    betas = [h[name] for name in check.bias_corrected]

    def extra(t: int) -> float:
        return scale * sum(1.0 / (1.0 - b ** t) + 2.0 * min(t, 1.0 / (1.0 - b)) for b in betas)

    return extra


def _param_errors(check, dtype, problem, ours, theirs):
    h = check.full_hyper
    bounds = trajectory_bounds(check.model_rule or check.rule, h, dtype, problem.params, ours,
                               other_dtype=dtype, extra_kappa=_peer_kappa(check, dtype, h),
                               grads=problem.grads)
    errors, tolerances = [], []
    for xs, ys, bs in zip(ours, theirs, bounds):
        step_errors, step_tolerances = [], []
        for x, y, b in zip(xs, ys, bs):
            if np.shape(y) != np.shape(x):
                raise ValueError(f"{check.peer} returned shape {np.shape(y)} for {np.shape(x)}")
            scale = float(np.max(np.abs(x), initial=0.0))
            if scale == 0.0:  # empty tensors
                step_errors.append(0.0)
                step_tolerances.append(np.inf)
                continue
            step_errors.append(float(np.max(np.abs(y - x))) / scale)
            step_tolerances.append(float(np.max(b)) / scale)
        errors.append(step_errors)
        tolerances.append(step_tolerances)
    return errors, tolerances


def _state_errors(check, dtype, ours, theirs):
    """Coordinate-wise relative errors of a positive state buffer (the variance ``v``):
    it is an average of positive terms, so its relative error stays within the rounding
    model of its rule: ``2 eps kappa_t`` (the core's rounding and the peer's)."""
    h = check.full_hyper
    eps = 2.0 * machine_eps(dtype)
    errors, tolerances = [], []
    for t, (xs, ys) in enumerate(zip(ours, theirs), start=1):
        step_errors, step_tolerances = [], []
        for x, y in zip(xs, ys):
            y = np.broadcast_to(y, np.shape(x))
            relative = np.abs(y - x) / np.abs(x) if x.size else np.zeros(0)
            step_errors.append(float(np.max(relative, initial=0.0)))
            step_tolerances.append(eps * kappa(check.rule, h, t, x.size))
        errors.append(step_errors)
        tolerances.append(step_tolerances)
    return errors, tolerances


def _judge(check, dtype, errors, tolerances) -> PeerResult:
    ratios = [(e / tol if tol > 0 else (np.inf if e > 0 else 0.0), t, i)
              for t, (es, tols) in enumerate(zip(errors, tolerances), start=1)
              for i, (e, tol) in enumerate(zip(es, tols))]
    _, t, i = max(ratios)
    error, tolerance = errors[t - 1][i], tolerances[t - 1][i]
    largest = max(e for es in errors for e in es)
    return PeerResult(check.rule, check.peer, dtype, error, tolerance,
                      bool(np.isfinite(error) and error <= tolerance),
                      where=f"step {t}, tensor {i}", largest=largest, label=check.label)


def report_lines(results) -> list[str]:
    """A table of results, one line each."""
    width = max([len(r.label) for r in results] + [4])
    peer_width = max([len(r.peer) for r in results] + [4])
    head = (f"{'rule':<{width}} {'peer':<{peer_width}} {'dtype':<7} {'max error':>9} "
            f"{'tolerance':>9}  result")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.skipped:
            outcome, numbers = f"skipped: {r.skipped}", f"{'':>9} {'':>9}"
        else:
            outcome = "pass" if r.passed else f"FAIL ({r.where})"
            numbers = f"{r.max_error:>9.2e} {r.tolerance:>9.2e}"
        lines.append(f"{r.label:<{width}} {r.peer:<{peer_width}} {r.dtype:<7} {numbers}  {outcome}")
    return lines
