"""The sharded half of ``tests/test_distributed_jax.py``: run in a process of its own
with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX starts).

Every transformation of :mod:`mvn_core.adapters.optax`, and every pure rule, runs
under ``jax.jit`` on params placed by ``NamedSharding`` over a 2x2 device mesh, and
again on one device with the same numbers.  Prints one JSON line: per transformation,
the largest difference between the two runs, whether the state and the params keep
the params' layout, the collectives of the compiled sharded step, and the custom calls
of the generated kernel in either step (it runs on one device only).
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import mvn_core
from mvn_core.adapters import optax as adapter

jax.config.update("jax_enable_x64", True)
STEPS = 3
MESH = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
# Weights split over one axis, the other or both, a replicated vector and a 0-d scale.
LAYOUT = {"w1": ((8, 6), P("data", "model")), "b1": ((6,), P("model")),
          "w2": ((6, 4), P(None, "data")), "conv": ((4, 2, 3, 3), P("model")),
          "embedding": ((16, 8), P(("data", "model"))), "bias": ((5,), P()),
          "scale": ((), P())}


def draw(rng):
    return {k: rng.standard_normal(shape) + 1.0 for k, (shape, _) in LAYOUT.items()}


def sharded(tree):
    return {k: jax.device_put(v, NamedSharding(MESH, LAYOUT[k][1])) for k, v in tree.items()}


def on_one_device(tree):
    return {k: jax.device_put(v, jax.devices()[0]) for k, v in tree.items()}


def transformations():
    """Every public transformation of the optax adapter, with weight decay where it
    takes one; ``gan`` alone (it transforms gradients) and in front of SGD."""
    out = {}
    for name in adapter.FACTORIES:
        make = getattr(adapter, name)
        kwargs = {"momentum": 0.9} if name.endswith("sgd") else {}
        if name.startswith("scale_by_") or name == "gan":
            out[name] = make(**kwargs)
        else:
            out[name] = make(0.1, weight_decay=0.1, **kwargs)
    out["gan+sgd"] = optax.chain(adapter.gan(), adapter.sgd(0.1, momentum=0.9))
    return out


def optax_step(transformation):
    def step(params, state, grads):
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates
    return step


def pure_step(rule):
    def step(params, state, grads):
        keys = sorted(params)
        flat = [params[k] for k in keys]
        if rule.kind == "transform":
            out, state = rule.update(state, [grads[k] for k in keys])
            return params, state, dict(zip(keys, out))
        updates, state = rule.update(state, [grads[k] for k in keys], flat, lr=0.1,
                                     weight_decay=0.1)
        return dict(zip(keys, mvn_core.apply_updates(flat, updates))), state, dict(
            zip(keys, updates))
    return step


def run(step, init, place, seed=0):
    rng = np.random.default_rng(seed)
    params = place(draw(rng))
    state = init(params)
    jitted = jax.jit(step)
    grads = [place(draw(rng)) for _ in range(STEPS)]
    text = jitted.lower(params, state, grads[0]).compile().as_text()
    for g in grads:
        params, state, updates = jitted(params, state, g)
    return params, state, updates, text


def compare(step, init):
    params, state, updates, text = run(step, init, sharded)
    params1, state1, updates1, text1 = run(step, init, on_one_device)
    error = 0.0
    for a, b in zip(jax.tree.leaves((params, state, updates)),
                    jax.tree.leaves((params1, state1, updates1))):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if b.size:
            error = max(error, float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b)))))
    return {"error": error, **layout(params, state, updates),
            "all_gathers": _count(text, "all-gather"), "all_reduces": _count(text, "all-reduce"),
            "other_collectives": sum(_count(text, c) for c in OTHER_COLLECTIVES),
            "kernel_calls": _kernel_calls(text), "kernel_calls_one_device": _kernel_calls(text1)}


def layout(params, state, updates):
    """Whether params, updates and every state buffer shaped like a param are laid out
    as that param, and whether every other state array (counts, NovoGrad's norms) lies
    on all devices rather than gathered onto one."""
    same = all(updates[k].sharding.is_equivalent_to(p.sharding, p.ndim) and
               p.sharding.is_equivalent_to(NamedSharding(MESH, LAYOUT[k][1]), p.ndim)
               for k, p in params.items())
    buffers = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        key = _param_of(path, sorted(params))
        if key in params and leaf.shape == params[key].shape and leaf.ndim:
            buffers.append(leaf.sharding.is_equivalent_to(params[key].sharding, leaf.ndim))
        else:
            buffers.append(len(leaf.sharding.device_set) == len(jax.devices()))
    return {"params_and_updates_keep_layout": bool(same),
            "state_keeps_layout": bool(all(buffers)), "state_arrays": len(buffers)}


def _param_of(path, keys):
    """The param a state leaf belongs to: its key in the optax adapter's trees, its
    index in the pure rules' tuples (of the params in sorted order)."""
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return entry.key
    last = path[-1]
    return keys[last.idx] if isinstance(last, jax.tree_util.SequenceKey) else None


def pure_init(rule):
    return lambda params: rule.init([params[k] for k in sorted(params)])


# the HLO collectives besides all-gather and all-reduce: a step should issue none
OTHER_COLLECTIVES = ("reduce-scatter", "all-to-all", "collective-permute",
                     "collective-broadcast", "ragged-all-to-all")


def _kernel_calls(text):
    return text.count('custom_call_target="mvn_core_')


def _count(text, collective):
    return len(re.findall(rf"= [^=]*\b{collective}(-start)?\(", text))


def main():
    assert len(jax.devices()) == 4, jax.devices()
    report = {"optax": {}, "pure": {}}
    for name, transformation in transformations().items():
        report["optax"][name] = compare(optax_step(transformation), transformation.init)
    for name, rule in mvn_core.rules.items():
        report["pure"][name] = compare(pure_step(rule), pure_init(rule))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
