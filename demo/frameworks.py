"""The demo's framework runs: the same classifier, from the same weights on the same
batches, as a ``torch.nn.Module`` differentiated by autograd and trained with
:class:`mvn_core.adapters.torch.MVNGrad`, and as a JAX model differentiated by
``jax.grad`` and trained with :func:`mvn_core.adapters.optax.mvn_grad`."""

from __future__ import annotations

from .training import Result, finished, training_loop

TORCH_PATH = "torch.nn + adapters.torch.MVNGrad"


def _only_mvn(rule_name):
    if rule_name != "mvn":
        raise ValueError(f"the demo's framework runs train MVN-Grad, not {rule_name!r}")


def train_torch_module(rule_name, run, data, init, batches, lr, progress=None) -> Result:
    """MVN-Grad (``rule_name`` must be "mvn") on a ``torch.nn.Sequential``."""
    _only_mvn(rule_name)
    import torch

    from mvn_core.adapters.torch import MVNGrad

    linears = [torch.nn.Linear(*w.shape) for w in init[0::2]]
    model = torch.nn.Sequential(linears[0], torch.nn.Tanh(), linears[1])
    model.to(device=run.device, dtype=getattr(torch, run.dtype))
    with torch.no_grad():
        for linear, w, b in zip(linears, init[0::2], init[1::2]):
            linear.weight.copy_(torch.tensor(w.T))  # torch stores (out, in)
            linear.bias.copy_(torch.tensor(b))
    opt = MVNGrad(model.parameters(), lr=lr)

    def step(carry, x, y, batch):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        return carry, loss.detach()

    _, losses, ms = training_loop(run, step, None, data, batches, progress)
    params = [t for linear in linears for t in (linear.weight.detach().T, linear.bias.detach())]
    return finished("mvn", run, TORCH_PATH, params, losses, ms, data)


JAX_PATH = "jax.grad + adapters.optax.mvn_grad"


def train_jax_model(rule_name, run, data, init, batches, lr, progress=None) -> Result:
    """MVN-Grad (``rule_name`` must be "mvn") on a JAX model, jitted as a whole."""
    _only_mvn(rule_name)
    import jax
    import jax.numpy as jnp
    import optax

    from mvn_core.adapters.optax import mvn_grad

    def put(a):
        return jax.device_put(jnp.asarray(a, dtype=run.dtype), run.device)

    params = {"hidden": {"w": put(init[0]), "b": put(init[1])},
              "out": {"w": put(init[2]), "b": put(init[3])}}
    opt = mvn_grad(lr)

    def loss_fn(params, x, y):
        hidden = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
        logits = hidden @ params["out"]["w"] + params["out"]["b"]
        return optax.softmax_cross_entropy(logits, y).mean()

    @jax.jit
    def step(carry, x, y, batch):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, x[batch], y[batch])
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), losses, ms = training_loop(run, step, (params, opt.init(params)), data,
                                            batches, progress)
    flat = [params["hidden"]["w"], params["hidden"]["b"], params["out"]["w"], params["out"]["b"]]
    return finished("mvn", run, JAX_PATH, flat, losses, ms, data)
