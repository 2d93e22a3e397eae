"""Guarantees that span the core and every adapter: the step count never wraps, and
non-finite gradients follow the documented policy (IEEE arithmetic by default; a whole
step skipped on request, with state, count and params untouched)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import mvn_core
from mvn_core.conformance import oracle
COUNT_MAX = 2 ** 31 - 1  # the largest int32: where the count stops

RULES = list(mvn_core.rules)
OPTIMIZERS = [name for name, rule in mvn_core.rules.items() if rule.kind == "optimizer"]
# Far enough that every bias correction is exactly 1 (b**t underflows), as at COUNT_MAX.
LATE = 2 ** 20


def _params():
    return [np.linspace(-1, 1, 6).reshape(3, 2), np.linspace(0.5, 2, 4)]


def _grads(scale=1.0):
    return [scale * np.linspace(0.3, -0.7, 6).reshape(3, 2), scale * np.linspace(-1, 1, 4)]


def _update(rule, state, grads, params, update=None):
    update = update or rule.update
    if rule.kind == "transform":
        return update(state, grads)
    return update(state, grads, params, lr=0.1, weight_decay=0.01)


def _at_count(state, count, xp=np):
    return state._replace(count=xp.asarray(count, dtype=xp.int32))


def _arrays(state):
    return [a for f in state for a in (f if isinstance(f, tuple) else (f,))]


# --- the count ------------------------------------------------------------------------


@pytest.mark.parametrize("name", RULES)
def test_the_count_saturates_instead_of_wrapping(name):
    """Two steps from 2**31 - 2 end at 2**31 - 1 and stay there, computing what a late
    step computes (the bias corrections are 1 long before)."""
    rule = mvn_core.rules[name]
    params = _params()
    _, warm = _update(rule, rule.init(params), _grads(), params)
    state, late = _at_count(warm, COUNT_MAX - 1), _at_count(warm, LATE)
    for scale in (1.0, -2.0):
        out, state = _update(rule, state, _grads(scale), params)
        expected, late = _update(rule, late, _grads(scale), params)
        assert state.count.dtype == np.int32 and int(state.count) == COUNT_MAX
        for u, v in zip(out, expected):
            np.testing.assert_array_equal(u, v)


def test_the_count_saturates_under_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from mvn_core.adapters import optax as mvn_optax

    transformation = mvn_optax.adam(0.1)
    params = [jnp.ones(3, dtype=jnp.float32)]
    state = transformation.init(params)._replace(count=jnp.asarray(COUNT_MAX - 1, jnp.int32))
    update = jax.jit(transformation.update)
    for _ in range(2):
        updates, state = update([jnp.full(3, 0.5, jnp.float32)], state, params)
        assert int(state.count) == COUNT_MAX
        assert np.all(np.isfinite(np.asarray(updates[0]))) and np.all(np.asarray(updates[0]) < 0)


@pytest.mark.parametrize("path", [{}, {"foreach": True}, {"foreach": False}, {"fused": True}],
                         ids=["kernel", "multi_tensor", "reference", "fused"])
def test_torch_counts_saturate_on_every_path(path):
    torch = pytest.importorskip("torch")
    from mvn_core.adapters.torch import Adam

    p = torch.nn.Parameter(torch.ones(3))
    opt = Adam([p], lr=0.1, **path)
    p.grad = torch.full((3,), 0.5)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["step"] = torch.tensor(COUNT_MAX - 1, dtype=torch.int32)
    opt.load_state_dict(saved)
    for _ in range(2):
        before = p.detach().clone()
        opt.step()
        assert int(opt.state[p]["step"]) == COUNT_MAX
        assert torch.all(p < before)  # a real step: Adam's direction is sign(g) here


def test_arrays_counts_saturate():
    from mvn_core.adapters.arrays import MVNGrad

    opt = MVNGrad(_params(), lr=0.1)
    opt.step(_grads())
    saved = opt.state_dict()
    saved["state"]["count"] = np.asarray(COUNT_MAX - 1, dtype=np.int32)
    opt.load_state_dict(saved)
    for _ in range(2):
        before = [p.copy() for p in opt.params]
        opt.step(_grads())
        assert int(opt.state.count) == COUNT_MAX
        assert all(np.all(np.isfinite(p)) and not np.array_equal(p, b)
                   for p, b in zip(opt.params, before))


@pytest.mark.parametrize("step", [2 ** 31 + 5, -1], ids=["beyond_int32", "negative"])
def test_torch_refuses_a_loaded_count_out_of_range(step):
    torch = pytest.importorskip("torch")
    from mvn_core.adapters.torch import MVNGrad

    p = torch.nn.Parameter(torch.ones(3))
    opt = MVNGrad([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    for bad in (torch.tensor(step, dtype=torch.int64), step):
        saved = opt.state_dict()
        saved["state"][0]["step"] = bad
        with pytest.raises(ValueError, match=rf"step={step} is out of range"):
            opt.load_state_dict(saved)
        assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())
    saved["state"][0]["step"] = torch.tensor(True)
    with pytest.raises(ValueError, match="step must be a 0-d integer tensor or a whole number"):
        opt.load_state_dict(saved)


@pytest.mark.parametrize("count", [-7, COUNT_MAX + 1])
def test_arrays_refuses_a_loaded_count_out_of_range(count):
    from mvn_core.adapters.arrays import MVNGrad

    opt = MVNGrad(_params(), lr=0.1)
    saved = opt.state_dict()
    saved["state"]["count"] = np.asarray(count, dtype=np.int64)  # int64: any value fits
    with pytest.raises(TypeError, match="count has dtype int64"):
        opt.load_state_dict(saved)
    if count < 0:
        saved["state"]["count"] = np.asarray(count, dtype=np.int32)
        with pytest.raises(ValueError, match=r"count is -7: a step count lies in \[0, 2\*\*31"):
            opt.load_state_dict(saved)
    assert int(opt.state.count) == 0


@pytest.mark.parametrize("dtype", [np.bool_, np.int16, np.uint8])
def test_the_core_refuses_counts_that_cannot_hold_the_range(dtype):
    """The core reads no count (it may be traced): it refuses the dtypes that cannot
    hold 0..2**31 - 1 (booleans, narrow integers, which would wrap early)."""
    for name in RULES:
        rule = mvn_core.rules[name]
        state = rule.init(_params())._replace(count=np.asarray(1, dtype=dtype))
        with pytest.raises(TypeError, match="state.count"):
            _update(rule, state, _grads(), _params())


# --- non-finite gradients: the default, IEEE arithmetic ------------------------------------


def _gradients_with(bad):
    """Five steps of gradients for the two tensors; at step 2 the first entry of the
    2-d tensor is ``bad``."""
    rng = np.random.default_rng(0)
    steps = [[rng.standard_normal((3, 2)), rng.standard_normal(4)] for _ in range(5)]
    steps[1][0][0, 0] = bad
    return steps


def _nonfinite_params(rule_name, grads_per_step, gan=False):
    """Which parameters are not finite after the steps (GAN in front with ``gan``)."""
    rule = mvn_core.rules[rule_name]
    params = _params()
    state, gan_state = rule.init(params), mvn_core.gan_init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the NaN is the point
        for grads in grads_per_step:
            if gan:
                grads, gan_state = mvn_core.gan_update(gan_state, grads)
            out, state = rule.update(state, grads, params, lr=0.1)
            params = [p + u for p, u in zip(params, out)]
    return [~np.isfinite(p) for p in params]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_default_policy_is_the_documented_ieee_arithmetic(name, bad):
    """What the contract's "Non-finite gradients" says (docs/guide/pure-api.md): IEEE
    arithmetic, so the coordinates lost are those the float64 reference loses (a
    per-coordinate rule loses that coordinate and nothing else, NovoGrad the whole
    tensor to a NaN; Lion's sign keeps an Inf finite); GAN in front spreads either over
    every tensor of 2 or more dimensions."""
    steps = _gradients_with(bad)
    poisoned = _nonfinite_params(name, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reference = oracle.trajectory(name, _params(), steps, lr=0.1)[-1]
    for got, want in zip(poisoned, reference):
        np.testing.assert_array_equal(got, ~np.isfinite(want))
    assert not poisoned[1].any()  # the other tensor steps on
    poisoned = _nonfinite_params(name, steps, gan=True)
    assert poisoned[0].all()
    assert not poisoned[1].any()


# --- non-finite gradients: skipping the step ------------------------------------------------


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_skip_if_nonfinite_leaves_everything_as_it_was(name, bad):
    rule = mvn_core.rules[name]
    update = mvn_core.skip_if_nonfinite(rule.update)
    params = _params()
    params[1][0] = -0.0  # updates of -0.0 keep even a negative zero's sign
    _, state = _update(rule, rule.init(params), _grads(), params)
    grads = _grads()
    grads[1][2] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, new_state = _update(rule, state, grads, params, update)
    for a, b in zip(_arrays(new_state), _arrays(state)):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert int(new_state.count) == int(state.count) == 1
    if rule.kind == "transform":  # passed through, so that a guarded rule after it skips too
        for u, g in zip(out, grads):
            np.testing.assert_array_equal(u, g)
    else:
        new_params = mvn_core.apply_updates(params, out)
        for p, q in zip(new_params, params):
            assert p.tobytes() == q.tobytes()
    # finite gradients: exactly the rule's own step
    out, new_state = _update(rule, state, _grads(), params, update)
    expected, expected_state = _update(rule, state, _grads(), params)
    for a, b in zip([*out, *_arrays(new_state)], [*expected, *_arrays(expected_state)]):
        np.testing.assert_array_equal(a, b)


def test_skip_if_nonfinite_under_jit_and_the_count_tells_a_skipped_step():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    update = mvn_core.skip_if_nonfinite(mvn_core.mvn_update)
    traces = []

    @jax.jit
    def step(state, grads, params):
        traces.append(1)
        updates, new_state = update(state, grads, params, lr=0.1, weight_decay=0.01)
        return mvn_core.apply_updates(params, updates), new_state, new_state.count == state.count

    params = [jnp.ones((2, 3), dtype=jnp.float32), jnp.zeros(2, dtype=jnp.float32)]
    state = mvn_core.mvn_init(params)
    finite = [jnp.full((2, 3), 0.5, jnp.float32), jnp.ones(2, jnp.float32)]
    poisoned = [finite[0].at[1, 1].set(jnp.nan), finite[1]]
    reference_params, reference_state, _ = step(state, finite, params)
    for grads in (poisoned, finite):
        new_params, new_state, skipped = step(state, grads, params)
        if grads is poisoned:
            assert bool(skipped) and int(new_state.count) == 0
            assert all(np.array_equal(a, b) for a, b in zip(new_params, params))
            assert all(np.array_equal(a, b) for a, b in zip(_arrays(new_state), _arrays(state)))
        else:
            assert not bool(skipped) and int(new_state.count) == 1
            assert all(np.array_equal(a, b) for a, b in zip(new_params, reference_params))
    assert len(traces) == 1


def test_all_finite():
    assert bool(mvn_core.all_finite([np.zeros(3), np.zeros((0, 2)), np.float32(1e38) * np.ones(2)]))
    assert bool(mvn_core.all_finite(np.full(3, 3e38, dtype=np.float32)))  # sums could overflow
    assert not bool(mvn_core.all_finite([np.zeros(3), np.array([1.0, np.inf])]))
    assert not bool(mvn_core.all_finite((np.array([np.nan], dtype=np.float16), np.ones(2))))


@pytest.mark.parametrize("path", [{}, {"foreach": False}], ids=["multi_tensor", "reference"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_torch_skip_nonfinite(name, path):
    """Every class has the option (it is generated); a skipped group changes nothing
    and counts the skip; the other groups step; finite steps are the rule's."""
    torch = pytest.importorskip("torch")
    from mvn_core.adapters import torch as adapters

    cls = adapters.OPTIMIZERS[name]
    make = lambda: [torch.nn.Parameter(torch.tensor(p)) for p in _params()]  # noqa: E731
    a, b = make(), make()
    opt = cls([{"params": a[:1]}, {"params": a[1:], "skip_nonfinite": False}], lr=0.1,
              skip_nonfinite=True, gan=True, **path)
    reference = cls([{"params": b[:1]}, {"params": b[1:]}], lr=0.1, gan=True, **path)
    for p, g in zip(a + b, _grads() * 2):
        p.grad = torch.tensor(g)
    opt.step()
    reference.step()
    before = [p.detach().clone() for p in a]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in a]
    gan_state = opt.param_groups[0]["gan_state"]
    a[0].grad = torch.tensor(_grads()[0])
    a[0].grad[0, 1] = float("nan")
    a[1].grad = torch.tensor(_grads()[1])
    opt.step()  # group 0 is skipped; group 1 steps
    assert torch.equal(a[0].detach(), before[0])
    assert all(torch.equal(opt.state[a[0]][k], v) for k, v in state[0].items())
    assert opt.param_groups[0]["gan_state"] is gan_state
    assert not torch.equal(a[1].detach(), before[1])
    assert [g["skipped_steps"] for g in opt.param_groups] == [1, 0]
    b[1].grad = torch.tensor(_grads()[1])
    b[0].grad = None
    reference.step()
    for p in a + b:
        p.grad = torch.tensor(_grads(0.5)[0 if p.ndim == 2 else 1])
    opt.step()
    reference.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert opt.state_dict()["param_groups"][0]["skipped_steps"] == 1


def test_torch_skipped_steps_survive_a_state_dict_round_trip():
    torch = pytest.importorskip("torch")
    from mvn_core.adapters.torch import Adam

    p = torch.nn.Parameter(torch.ones(2))
    opt = Adam([p], skip_nonfinite=True)
    p.grad = torch.tensor([1.0, float("inf")])
    opt.step()
    opt.step()
    assert not opt.state[p] and opt.param_groups[0]["skipped_steps"] == 2
    fresh = Adam([torch.nn.Parameter(torch.ones(2))])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["skipped_steps"] == 2
    assert fresh.param_groups[0]["skip_nonfinite"] is True


def test_optax_skip_nonfinite_under_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    import optax

    from mvn_core.adapters import optax as mvn_optax

    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    for make in (lambda skip: mvn_optax.mvn_grad(0.1, weight_decay=0.01, skip_nonfinite=skip),
                 lambda skip: optax.chain(mvn_optax.gan(skip_nonfinite=skip),
                                          mvn_optax.sgd(0.1, momentum=0.9, skip_nonfinite=skip))):
        transformation = make(True)
        state = transformation.init(params)
        update = jax.jit(transformation.update)
        bad = {"w": jnp.ones((2, 2)).at[0, 0].set(jnp.inf), "b": jnp.ones(2)}
        updates, new_state = update(bad, state, params)
        new_params = optax.apply_updates(params, updates)
        for x, y in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, state))):
            assert np.array_equal(x, y)
        good = {"w": jnp.full((2, 2), 0.5), "b": jnp.ones(2)}
        expected, _ = make(False).update(good, state, params)
        updates, new_state = update(good, state, params)
        for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
            assert np.array_equal(x, y)


@pytest.mark.parametrize("gan", [False, True], ids=["plain", "gan"])
def test_arrays_skip_nonfinite(gan):
    from mvn_core.adapters.arrays import Adam

    opt = Adam(_params(), lr=0.1, skip_nonfinite=True, gan=gan)
    reference = Adam(_params(), lr=0.1, gan=gan)
    opt.step(_grads())
    reference.step(_grads())
    saved = opt.state_dict()
    params = [p.copy() for p in opt.params]
    bad = _grads()
    bad[0][1, 1] = np.nan
    opt.step(bad)
    assert opt.skipped_steps == 1
    assert all(p.tobytes() == q.tobytes() for p, q in zip(opt.params, params))
    assert int(opt.state.count) == 1 and (not gan or int(opt.gan_state.count) == 1)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):  # still checked
        opt.step([bad[0], np.ones(5)])
    opt.step(_grads(0.5))
    reference.step(_grads(0.5))
    assert all(p.tobytes() == q.tobytes() for p, q in zip(opt.params, reference.params))
    assert opt.state_dict()["skipped_steps"] == 1
    del saved["skipped_steps"]  # saved by an older version
    opt.load_state_dict(saved)
    assert opt.skipped_steps == 0
