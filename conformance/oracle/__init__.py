"""A float64 reference for every rule, written from docs/algorithms.md alone: the rules'
oracle entries, one module per rule, named as the rule.

An entry shares no code with ``mvn_core`` (nothing here imports it) and is written in
a different style on purpose: plain NumPy float64, one explicit function per rule, the
first-step cases as Python ``if``s, bias corrections as ``1 - b**t`` in double
precision, no rounding guards.  Agreement between the two is therefore evidence that
both follow the document, not that they share a mistake.

Beside the reference step, an entry holds what the tests and checks need to know of
its rule that is not in the rule's declaration: the defaults restated from the
document (a test compares them with the declaration's), the closed form of the first
step, how the rule scales with its gradients, the rounding its own arithmetic adds to
the tolerance model, and the *peers*: implementations of the same mathematics in other
libraries, configured to coincide.  So adding a rule is its module in ``mvn_core``, its
entry here and its section of docs/algorithms.md; a rule without an entry fails the
tests that enumerate the registry.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass
from types import MappingProxyType
from collections.abc import Mapping
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np


@dataclass(frozen=True)
class Peer:
    """An implementation of a rule's mathematics in another library, configured to
    coincide with the rule run with ``hyper`` (the rule's defaults fill in).

    ``library`` is ``"torch"`` (``make(params, h)`` returns a ``torch.optim``
    optimizer; ``h`` is the full hyperparameters) or ``"optax"`` (``make(optax, h)``
    returns a transformation), ``requires`` the modules it needs.  ``state`` compares
    a state buffer instead of the parameters: ``(ours, theirs)`` names.  ``core`` runs
    the rule with crafted inputs instead of plainly: ``core(mvn_core, problem, dtype,
    **hyper)`` returns its parameters per step.  ``bias_corrected`` names the betas the
    peer bias-corrects itself (its rounding there is counted), ``scalars_in_run_dtype``
    says it keeps those scalars in the run's dtype; ``model_rule`` the rule whose
    rounding model applies, if not this one.  ``bench`` lists the peer's options timed
    by ``mvn-core bench`` (torch: ``"foreach"``, ``"fused"``, ``"loop"``; optax:
    ``"jit"``); ``bench_make`` builds it for the benchmark where ``make`` would not
    (another variant of the peer).
    """

    name: str
    hyper: Mapping[str, Any]
    library: str
    make: Callable
    requires: tuple[str, ...]
    state: tuple[str, str] | None = None
    core: Callable | None = None
    bias_corrected: tuple[str, ...] = ()
    scalars_in_run_dtype: bool = False
    model_rule: str | None = None
    note: str = ""
    bench: tuple[str, ...] = ()
    bench_make: Callable | None = None


@dataclass(frozen=True)
class Scaling:
    """Scaling the gradients by ``c = 2^k`` scales the rule's updates by
    ``c ** updates`` exactly, when each hyperparameter of ``eps`` is scaled by
    ``c ** power`` (as the quantity it is added to)."""

    eps: Mapping[str, int]
    updates: int = 0


class Switch(NamedTuple):
    """Where a rule's update jumps as a value crosses zero (Lion's sign): that value as
    the oracle computes it, the magnitude its rounding is relative to (the terms it is
    summed from), and the size of the jump of the parameter."""

    value: np.ndarray
    scale: np.ndarray
    jump: float


@dataclass(frozen=True)
class Entry:
    """One rule's reference (see the module's docstring).

    ``step(t, theta, g, s, h)`` returns the parameter after step ``t`` (``s`` the
    tensor's buffers by name, updated in place; ``h`` the full hyperparameters); a
    transform has ``transform(grads, **h) -> (out, alpha)`` instead.  ``buffers`` start
    at zeros like the parameter, ``tensor_buffers`` at a number.  ``first_direction(g,
    h)`` is the closed form of step 1's direction (``update = -lr * direction``), exact
    up to rounding; ``first_direction_error(h)`` the factor by which the rule's
    rounding of it may exceed a plain formula's (``g - m_1 = b1 g``, formed as a
    difference, loses ``log2(1 / b1)`` bits: a factor ``1 / b1``).
    ``scaling`` is None for a rule that does not scale with its gradients.
    ``rounding(h, t)`` is what the rule's own arithmetic adds to the tolerance model
    at step ``t``, in units of eps (AdaBelief's rectification).  ``half_state`` says
    whether its buffers fit a float16 state for every gradient of the supported range.
    ``switches(grads_per_step, h)`` gives, for a rule whose update jumps where a value
    crosses zero, that value per step and tensor (:class:`Switch`): a run may land on
    the other side where the value lies within its rounding of zero.
    """

    defaults: Mapping[str, Any]
    buffers: tuple[str, ...] = ()
    tensor_buffers: tuple[str, ...] = ()
    step: Callable | None = None
    transform: Callable | None = None
    first_direction: Callable | None = None
    first_direction_error: Callable[[Mapping], float] = lambda h: 1.0
    scaling: Scaling | None = None
    rounding: Callable[[Mapping, int], float] | None = None
    half_state: bool = True
    switches: Callable[[list, Mapping], list] | None = None
    peers: tuple[Peer, ...] = ()


def trajectory(rule, params, grads_per_step, **hyper):
    """Run ``rule`` from ``params`` over the list of per-step gradient lists.

    Returns the parameters after each step (a list, per step, of float64 arrays).  For
    a transform (GAN) it returns each step's transformed gradients instead.
    """
    entry = ENTRIES[rule]
    h = dict(entry.defaults, **hyper)
    if entry.transform is not None:
        return [entry.transform(g, **h)[0] for g in grads_per_step]
    theta = [np.array(p, dtype=np.float64) for p in params]
    states = [{**{k: np.zeros_like(p) for k in entry.buffers},
               **{k: 0.0 for k in entry.tensor_buffers}} for p in theta]
    out = []
    for t, grads in enumerate(grads_per_step, start=1):
        theta = [entry.step(t, p, np.asarray(g, dtype=np.float64), s, h)
                 for p, g, s in zip(theta, grads, states)]
        out.append([np.array(p) for p in theta])
    return out


def transformed(rule, grads, **hyper):
    """A transform's output on one step's gradients, and the global factor it used
    (None where nothing was eligible)."""
    entry = ENTRIES[rule]
    return entry.transform(grads, **dict(entry.defaults, **hyper))


def betas(h, first="b1", second="b2"):
    """A peer's ``betas`` pair from the hyperparameters."""
    return (h[first], h[second])


def _discovered() -> dict[str, Entry]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            found[info.name] = importlib.import_module(f"{__name__}.{info.name}").ENTRY
    return found


_ENTRIES = _discovered()
ENTRIES: Mapping[str, Entry] = MappingProxyType(_ENTRIES)


class _Defaults(Mapping):
    """Each entry's defaults (a fresh dict), read from the entries as they are now."""

    def __getitem__(self, name: str) -> dict:
        return dict(_ENTRIES[name].defaults)

    def __iter__(self):
        return iter(_ENTRIES)

    def __len__(self) -> int:
        return len(_ENTRIES)


# The defaults of docs/algorithms.md, restated in the entries so that a test can
# compare them with the rules' declarations.
DEFAULTS: Mapping[str, dict] = _Defaults()


@contextlib.contextmanager
def including(extra: Mapping[str, Entry]) -> Iterator[None]:
    """Add the entries of rules defined elsewhere (by rule name) for the duration of
    the block: the references of ``mvn-core check --rules-from``."""
    taken = sorted(set(extra) & set(_ENTRIES))
    if taken:
        raise ValueError(f"oracle entries for {taken} exist already")
    _ENTRIES.update(extra)
    try:
        yield
    finally:
        for name in extra:
            del _ENTRIES[name]
