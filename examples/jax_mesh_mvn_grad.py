"""Train a small MLP with MVN-Grad (the optax adapter) under ``jax.jit`` on a 2x2 device
mesh: the batch split over the "data" axis, the hidden layer over the "model" axis.

    python examples/jax_mesh_mvn_grad.py     # 4 host CPU devices, made for the example

On a machine with 4 accelerators, remove the XLA_FLAGS line.  The params are placed
with ``NamedSharding``; ``mvn_grad``'s state is made from them, so it keeps their
layout, and the jitted step computes each shard's update where the shard lives.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # before JAX

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from mvn_core.adapters import optax as mvn_optax  # noqa: E402

MESH = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
LAYOUT = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}


def init_params(key):
    k1, k2 = jax.random.split(key)
    params = {"w1": jax.random.normal(k1, (16, 64)) / 4, "b1": jnp.zeros(64),
              "w2": jax.random.normal(k2, (64, 1)) / 8, "b2": jnp.zeros(1)}
    return {k: jax.device_put(v, NamedSharding(MESH, LAYOUT[k])) for k, v in params.items()}


def loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def batches(steps, size=64, seed=1):
    """Inputs and a fixed teacher's outputs, split over the "data" axis."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((16, 1)) / 4
    split = NamedSharding(MESH, P("data", None))
    for _ in range(steps):
        x = rng.standard_normal((size, 16)).astype(np.float32)
        yield jax.device_put(x, split), jax.device_put(np.sin(x @ teacher), split)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    optimizer = mvn_optax.mvn_grad(optax.cosine_decay_schedule(args.lr, args.steps),
                                   weight_decay=0.01)
    params = init_params(jax.random.key(0))
    state = optimizer.init(params)  # m, v, u laid out as the params

    @jax.jit
    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    log_every = max(1, args.steps // 6)
    for i, (x, y) in enumerate(batches(args.steps), start=1):
        params, state, value = step(params, state, x, y)
        if i == 1 or i % log_every == 0:
            print(f"step {i:4d}  loss {float(value):.5f}", flush=True)
    for name, p in params.items():
        print(f"{name}: params {p.sharding.spec}, state m {state.m[name].sharding.spec}, "
              f"v {state.v[name].sharding.spec}, u {state.u[name].sharding.spec}")


if __name__ == "__main__":
    main()
