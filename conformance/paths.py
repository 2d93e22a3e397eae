"""The registry of paths: the ways a rule can be executed, each checked against the oracle.

A :class:`Path` names one way (the pure functions, eagerly or compiled; an adapter;
a fast path of an adapter), the backends it applies to, and a function::

    run(rule_name, backend, device, dtype, problem, **hyper) -> trajectory

that runs the rule with ``hyper`` (the rule's own names, as ``mvn_core.<rule>_update``
takes them) over the :class:`~.problems.Problem` in the floating ``dtype`` (a name) on
``device``, and returns per step the list of parameters as float64 NumPy arrays.  For
GAN, a transform, it returns each step's transformed gradients: an adapter that takes
GAN only as an option in front of an optimizer runs it before SGD with ``lr=1`` from
zero parameters reset at every step, whose parameters are then exactly minus the
transformed gradients.

``mvn-core check`` runs every registered path on every backend it applies to.  Adding a
path is one registration; a fast path of the PyTorch optimizers, selected by an
option of the optimizer, is one line::

    register(torch_adapter_path("torch-foreach", foreach=True))

"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable

import numpy as np

import mvn_core
from mvn_core import backends

from .trajectories import core_trajectory


@dataclass(frozen=True)
class Path:
    """One way of executing the rules.

    ``backends`` lists the backend names it runs on (None: every backend, a
    ``--namespace`` one included); ``requires`` the modules it needs beyond the
    backend's library (a path whose module is missing is reported as skipped);
    ``rules`` the rules it takes (None: all of them).
    """

    name: str
    run: Callable
    backends: tuple[str, ...] | None
    description: str
    requires: tuple[str, ...] = ()
    rules: tuple[str, ...] | None = None
    by_default: bool = True  # False: only when named with --paths, or with --full
    # Its results must be, bit for bit: "pure", the pure path's on the same backend;
    # "ieee", the rule's mathematics in IEEE arithmetic from that backend's step scalars
    # (:func:`~.trajectories.ieee_trajectory`: what the generated kernels compute);
    # "ieee-compiled", the same from the scalars as the backend's compile hook computes
    # them (a kernel inside a jitted step: XLA computes some scalars otherwise).
    exact: str | None = None
    # Why it cannot run here beyond a missing module (no GPU, say), or None.
    needs: Callable[[], str | None] | None = None
    # What it promises on other devices than CPUs, where that differs ("same": ``exact``).
    exact_off_cpu: str | None = "same"

    def promise(self, device_name: str) -> str | None:
        """What its results must equal, bit for bit, on the device called so."""
        if self.exact_off_cpu == "same" or device_name.startswith("cpu"):
            return self.exact
        return self.exact_off_cpu

    def applies_to(self, backend: str) -> bool:
        return self.backends is None or backend in self.backends

    def takes(self, rule: str) -> bool:
        return self.rules is None or rule in self.rules

    def unavailable_reason(self) -> str | None:
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if absent:
            return f"{', '.join(absent)} is not installed"
        return self.needs() if self.needs else None


PATHS: dict[str, Path] = {}


def register(path: Path) -> Path:
    """Add ``path`` to :data:`PATHS` (its name must be new); returns it."""
    if path.name in PATHS:
        raise ValueError(f"a path called {path.name!r} is already registered")
    PATHS[path.name] = path
    return path


# --- the pure functions -----------------------------------------------------------------

def run_pure(rule_name, backend, device, dtype, problem, *, compiled=False, **hyper):
    """The rule's pure functions (:func:`~.trajectories.core_trajectory`), each step
    through the backend's compile hook when ``compiled``."""
    return as_float64(core_trajectory(rule_name, backend, problem, dtype=dtype, device=device,
                                      compiled=compiled, **hyper))


# --- the adapters ----------------------------------------------------------------------

def run_torch_adapter(rule_name, backend, device, dtype, problem, *, options=None, **hyper):
    """The ``torch.optim`` optimizer of :mod:`mvn_core.adapters.torch`, made with the
    extra constructor ``options`` (e.g. a fast path's switch)."""
    from mvn_core.adapters import torch as adapter

    options = dict(options or {})

    transform = _is_transform(rule_name)

    def make(params):
        if transform:
            return adapter.SGD(params, lr=1.0, gan=dict(hyper), **options)
        cls = adapter.optimizer_class(rule_name)
        return cls(params, **torch_arguments(cls, hyper), **options)

    def step(optimizer, params, grads):
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    return _run_in_place(backend, device, dtype, problem, make, step, transform)


def _is_transform(rule_name: str) -> bool:
    """A gradient transform (GAN) runs as the adapters take it: in front of SGD."""
    return mvn_core.rules[rule_name].kind == "transform"


def torch_arguments(cls, hyper: dict) -> dict:
    """The core's hyperparameters in the names of the torch optimizer ``cls``: the
    betas it takes as a pair gathered into ``betas`` (the rule's defaults filling in)."""
    out = {k: v for k, v in hyper.items() if k not in cls.beta_names}
    if any(name in hyper for name in cls.beta_names):
        out["betas"] = tuple(hyper.get(name, cls.rule.defaults[name]) for name in cls.beta_names)
    return out


def run_arrays_adapter(rule_name, backend, device, dtype, problem, fused=False, **hyper):
    """The in-place optimizer of :mod:`mvn_core.adapters.arrays` (NumPy, CuPy)."""
    from mvn_core.adapters import arrays as adapter

    transform = _is_transform(rule_name)

    def make(params):
        if transform:
            return adapter.SGD(params, lr=1.0, gan=dict(hyper))
        return adapter.optimizer_class(rule_name)(params, fused=fused, **hyper)

    def step(optimizer, params, grads):
        optimizer.step(grads)

    return _run_in_place(backend, device, dtype, problem, make, step, transform)


def _run_in_place(backend, device, dtype, problem, make, step, gan: bool) -> list:
    """Drive a stateful optimizer that updates its parameters in place.

    ``make(params)`` builds it, ``step(optimizer, params, grads)`` takes one step.  With
    ``gan`` the optimizer is SGD (lr 1, no momentum) behind GAN: the parameters are
    zeroed before each step, so afterwards they are exactly minus GAN's output.
    """
    lib = backends.get(backend)
    params = _convert(lib, problem.params, device, dtype)
    optimizer = make(params)
    out = []
    for grads in problem.grads:
        if gan:
            for p in params:
                p[...] = 0
        step(optimizer, params, _convert(lib, grads, device, dtype))
        values = float64_copies(lib.to_numpy(p) for p in params)
        out.append([-v for v in values] if gan else values)
    return out


def run_optax_adapter(rule_name, backend, device, dtype, problem, *, jit=False, **hyper):
    """The ``optax.GradientTransformation`` of :mod:`mvn_core.adapters.optax` (GAN's is a
    transform of its own), stepped eagerly or under ``jax.jit``."""
    import jax
    import optax

    tx = _optax_transformation(rule_name, dict(hyper))
    gan = _is_transform(rule_name)

    def one_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return (updates if gan else optax.apply_updates(params, updates)), state

    if jit:
        one_step = jax.jit(one_step)
    lib = backends.get(backend)
    params = _convert(lib, problem.params, device, dtype)
    state = tx.init(params)
    out = []
    for grads in problem.grads:
        result, state = one_step(params, state, _convert(lib, grads, device, dtype))
        params = params if gan else result
        out.append([lib.to_numpy(x) for x in result])
    return as_float64(out)


def _optax_transformation(rule_name: str, hyper: dict):
    from mvn_core.adapters import optax as adapter

    factory = adapter.transformation(rule_name)
    if _is_transform(rule_name):
        return factory(**hyper)
    return factory(hyper.pop("lr", mvn_core.rules[rule_name].defaults["lr"]), **hyper)




def _convert(lib, arrays, device, dtype) -> list:
    return [lib.from_numpy(a, device=device, dtype=dtype) for a in arrays]


def as_float64(trajectory) -> list:
    """A trajectory (per step, NumPy arrays) as float64 copies."""
    return [float64_copies(step) for step in trajectory]


def float64_copies(arrays) -> list:
    """Float64 copies of NumPy arrays: a path may hand back views of arrays that it goes
    on updating in place."""
    return [np.array(x, dtype=np.float64) for x in arrays]


# --- the registrations -------------------------------------------------------------------

def torch_adapter_path(name: str, description: str = "", **options) -> Path:
    """A path through the PyTorch optimizers made with ``options`` (a fast path's switch)."""
    return Path(name, functools.partial(run_torch_adapter, options=options), ("torch",),
                description or f"mvn_core.adapters.torch optimizers with {options}")


register(Path("pure", run_pure, None, "the pure functions, eagerly"))
register(Path("pure-jit", functools.partial(run_pure, compiled=True), ("jax",),
              "the pure functions, each step under jax.jit"))
# The adapters and the kernels promise exact results: the check fails them where they
# differ at all.  The generated kernels (the default of the torch and NumPy optimizers)
# compute in IEEE arithmetic, which PyTorch's own CPU square root is not.
register(dataclasses.replace(
    torch_adapter_path("torch-adapter", "mvn_core.adapters.torch optimizers (default: the "
                       "generated kernel on the CPU)"), exact="ieee"))
register(Path("optax-adapter", run_optax_adapter, ("jax",),
              "mvn_core.adapters.optax transformations, eagerly (default: the generated "
              "kernel on the CPU)", requires=("optax",), exact="ieee", exact_off_cpu="pure"))
register(Path("optax-adapter-jit", functools.partial(run_optax_adapter, jit=True), ("jax",),
              "mvn_core.adapters.optax transformations, each step under jax.jit (default: "
              "the generated kernel on the CPU)", requires=("optax",), exact="ieee-compiled",
              exact_off_cpu=None))
register(Path("arrays-adapter", run_arrays_adapter, ("numpy", "cupy"),
              "mvn_core.adapters.arrays in-place optimizers (default: the generated kernel "
              "for NumPy)", exact="ieee"))
register(dataclasses.replace(
    torch_adapter_path("torch-multi-tensor", "mvn_core.adapters.torch optimizers on torch's "
                       "multi-tensor kernels (foreach=True)", foreach=True), exact="pure"))
register(dataclasses.replace(
    torch_adapter_path("torch-reference", "mvn_core.adapters.torch optimizers calling the "
                       "pure rule (foreach=False)", foreach=False), exact="pure"))
# The GPU's generated kernels, one launch per step for all tensors, in IEEE arithmetic
# like the CPU's.
register(Path("arrays-fused", functools.partial(run_arrays_adapter, fused=True), ("cupy",),
              "mvn_core.adapters.arrays on CuPy, fused=True (the generated CUDA kernel)",
              rules=tuple(n for n, r in mvn_core.rules.items() if r.tensor_rule is not None),
              exact="ieee"))


def _no_cuda() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA device (it checks the Triton kernel)"


register(dataclasses.replace(
    torch_adapter_path("torch-fused", "mvn_core.adapters.torch optimizers with fused=True: "
                       "the generated kernel strictly (Triton on CUDA, C on the CPU)", fused=True),
    exact="ieee", requires=("torch", "triton"), needs=_no_cuda))
