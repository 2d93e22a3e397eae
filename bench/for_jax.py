"""JAX in ``mvn-core bench``: our optax transformations (:mod:`mvn_core.adapters.optax`:
on a CPU the generated kernel, with the state packed) and optax's own (``adam``, the
baseline, ``adamw``, ``adabelief``, ``novograd``, ``sgd``), each in one step function
under ``jax.jit`` with the params and the state donated, as a training loop runs them
(path ``jit``).

The temporaries of a step are XLA's own account of the compiled step
(``memory_analysis``), exact where a process's memory is not: the peak of a JAX
device cannot be reset, and on the CPU the runtime's own allocations blur it."""

from __future__ import annotations

import functools

import mvn_core
from mvn_core import backends

from .timing import (OURS, BackendBench, BenchCase, MemoryProbe, Stepper, Workload,
                           auto_device_kind, hyperparameters, split_sizes)
from mvn_core.conformance import oracle
from mvn_core.conformance.targets import device_name

NAME = "jax"
PATH = "jit"


def device_kind(wanted: str) -> str:
    return auto_device_kind(unavailable_reason, wanted)


def unavailable_reason(kind: str) -> str | None:
    reason = backends.get(NAME).unavailable_reason()
    if reason is None and kind == "gpu" and not _gpus():
        reason = "jax finds no GPU (install jax[cuda12])"
    return reason


def _gpus() -> list:
    import jax

    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU backend
        return []


def workload(n: int, k: int, kind: str) -> Workload:
    import jax
    import jax.numpy as jnp

    device = _gpus()[0] if kind == "gpu" else jax.devices("cpu")[0]
    sizes = split_sizes(n, k)
    keys = jax.random.split(jax.random.key(0), 2 * k)

    def normal(key, size):
        with jax.default_device(device):
            return jax.device_put(jax.random.normal(key, (size,), jnp.float32), device)

    params = [normal(key, size) for key, size in zip(keys[:k], sizes)]
    grads = [normal(key, size) for key, size in zip(keys[k:], sizes)]
    memory = DeviceMemory(device) if device.platform != "cpu" else MemoryProbe()
    memory.source += "; temporaries: XLA memory_analysis"
    return Workload(NAME, device, device_name(device), params, grads, memory,
                    functools.partial(_make_copy, n, device),
                    device.device_kind if device.platform != "cpu" else "")


def _make_copy(n, device):
    """A copy into a donated buffer, kept although unused (``keep_unused``): XLA writes
    into it, as the optimizer steps write into their donated params and state.  Without
    it each copy gets a fresh buffer, whose first touch costs more than the copy on a
    CPU (page faults)."""
    import jax
    import jax.numpy as jnp

    source, target = (jax.device_put(jnp.full(n, value, jnp.float32), device)
                      for value in (1.0, 0.0))
    copy_into = jax.jit(lambda target, source: jnp.copy(source), donate_argnums=0,
                        keep_unused=True)
    held = [target]

    def copy():
        held[0] = copy_into(held[0], source)
        held[0].block_until_ready()

    return copy


class DeviceMemory:
    """A JAX device's own counts (``device.memory_stats()``), where it keeps them.

    Its peak cannot be reset: a case's peak is known only where it rose above every
    earlier case's (None otherwise)."""

    source = "jax device.memory_stats()"

    def __init__(self, device):
        self.device = device
        self.peak_before = None

    def _stats(self) -> dict:
        return self.device.memory_stats() or {}

    def current(self) -> int | None:
        return self._stats().get("bytes_in_use")

    def reset_peak(self) -> None:
        self.peak_before = self._stats().get("peak_bytes_in_use")

    def peak(self) -> int | None:
        peak = self._stats().get("peak_bytes_in_use")
        if peak is None or self.peak_before is None or peak <= self.peak_before:
            return None
        return peak


def _jitted(tx):
    import jax
    import optax

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def _run(make_tx, rule_name: str, work: Workload) -> Stepper:
    """A stepper over the workload's params.  Its first step compiles (ahead of time,
    to read XLA's account of the step's temporaries).  The params are donated to the
    first step, so the stepper holds the latest ones and hands them back when closed."""
    import jax

    tx = make_tx(hyperparameters(rule_name))
    held = {"params": list(work.params), "state": tx.init(work.params), "step": None}

    def one_step():
        if held["step"] is None:
            held["step"] = _jitted(tx).lower(held["params"], held["state"], work.grads).compile()
        held["params"], held["state"] = held["step"](held["params"], held["state"], work.grads)
        jax.block_until_ready((held["params"], held["state"]))

    def state_bytes():
        return sum(leaf.nbytes for leaf in jax.tree.leaves(held["state"]))

    def temporary_bytes():
        analysis = held["step"].memory_analysis()
        return None if analysis is None else analysis.temp_size_in_bytes

    def close():
        work.params[:] = held["params"]

    return Stepper(one_step, state_bytes, close, temporary_bytes)


def _ours(rule_name, h):
    from mvn_core.adapters import optax as adapters

    factory = adapters.transformation(rule_name)
    return factory(**{("learning_rate" if k == "lr" else k): v for k, v in h.items()})


BASELINE = "optax.adam"  # the row every other is read against


def _peer(peer, h):
    import optax

    return peer.make(optax, {**h, **peer.hyper})


def _case(rule_name, implementation, make_tx, baseline=False) -> BenchCase:
    return BenchCase(NAME, rule_name, implementation, PATH,
                functools.partial(_run, make_tx, rule_name), requires=("optax",),
                baseline=baseline, compiled=True)


def cases() -> list[BenchCase]:
    ours = [_case(rule.name, OURS, functools.partial(_ours, rule.name))
            for rule in mvn_core.rules.values() if rule.kind == "optimizer"]
    peers = [_case(rule_name, peer.name, functools.partial(_peer, peer),
                   baseline=peer.name == BASELINE)
             for rule_name, entry in oracle.ENTRIES.items() for peer in entry.peers
             if peer.library == "optax" and "jit" in peer.bench]
    return [*sorted(peers, key=lambda case: not case.baseline), *ours]


BENCH = BackendBench(NAME, device_kind, unavailable_reason, workload, cases)
