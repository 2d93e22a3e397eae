"""The optax adapter: the rules as ``optax.GradientTransformation``s over any pytree.

On the CPU a step is the generated kernel (:mod:`mvn_core.adapters._jax_kernel`, whose
own tests are in ``test_jax_kernel.py``): equality is bitwise with the rule's
mathematics in IEEE arithmetic from the step's scalars as JAX computes them
(:func:`~mvn_core.conformance.trajectories.ieee_trajectory`).  The jitted pure rule
differs from it by a few ulps: XLA rewrites ``a * b + c`` into fused multiply-adds.
Agreement with optax's own implementations of the same mathematics is to rounding,
bounded by the project's rounding model (:mod:`mvn_core.conformance.tolerance`).
"""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
import warnings
from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

import mvn_core  # noqa: E402
from mvn_core.adapters import optax as adapter  # noqa: E402
from mvn_core.adapters._jax_kernel import Packed  # noqa: E402
from mvn_core.conformance import tolerance  # noqa: E402
from mvn_core.conformance.problems import make_problem  # noqa: E402
from mvn_core.conformance.trajectories import ieee_trajectory  # noqa: E402

OPTIMIZERS = {rule.function_name: name for name, rule in mvn_core.rules.items()
              if rule.kind == "optimizer"}
SHAPES = ((5, 4), (4,), (), (2, 3, 2, 3), (0, 3))
LR, WD = 1e-2, 0.1


class Layer(NamedTuple):
    kernel: Any
    bias: Any


def _tree(arrays, dtype=jnp.float64):
    """Five arrays as a pytree with a NamedTuple, nested dicts, a tuple and a None leaf."""
    kernel, bias, scale, conv, empty = (jnp.asarray(a, dtype=dtype) for a in arrays)
    return {"dense": Layer(kernel, bias), "block": {"conv": (conv, None), "scale": scale},
            "empty": empty}


def _hyper(rule_name):
    return {"momentum": 0.9, "weight_decay": WD} if rule_name == "sgd" else {"weight_decay": WD}


def _problem(steps, seed=5):
    return make_problem(steps, seed=seed, shapes=SHAPES)


# the problem's arrays in the order of the leaves of _tree (shapes tell them apart)
ORDER = [SHAPES.index(leaf.shape) for leaf in jax.tree.leaves(_tree([np.zeros(s) for s in SHAPES]))]


def _reference(rule_name, problem, dtype, *, state_dtype=None, jit=True, **hyper):
    """Per step, the params as the rule in IEEE arithmetic makes them (what the kernel
    computes), in the order of the leaves of :func:`_tree`."""
    steps = ieee_trajectory(rule_name, "jax", problem, dtype=jnp.dtype(dtype).name,
                            compiled=jit, state_dtype=state_dtype, **hyper)
    return [[step[i] for i in ORDER] for step in steps]


def _assert_params(params, expected):
    got = jax.tree.leaves(params)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float64)),
                                      np.asarray(b, dtype=np.float64))


def _as_tree(field):
    """A state field as a tree shaped like the params, packed or not."""
    return field.tree() if isinstance(field, Packed) else field


def _assert_same(got, expected):
    got, expected = jax.tree.leaves(got), jax.tree.leaves(expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float64)),
                                      np.asarray(b.astype(jnp.float64)))


def _assert_close(got, expected, rtol):
    """Equal to ``rtol`` relative to the tensor's largest entry (norm-wise: an entry near
    zero by cancellation carries the rounding of the large terms it came from)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    if expected.size:
        assert np.max(np.abs(got - expected)) <= rtol * np.max(np.abs(expected))


def _optax_step(transformation):
    @jax.jit
    def step(params, state, grads):
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates
    return step


# ---- the public functions

def test_public_functions_have_the_rules_signatures_and_documentation():
    P = inspect.Parameter
    for public, name in OPTIMIZERS.items():
        rule = mvn_core.rules[name]
        parameters = inspect.signature(getattr(adapter, public)).parameters
        assert list(parameters) == ["learning_rate", *list(rule.defaults)[1:], "state_dtype",
                                    "state_layout", "skip_nonfinite"]
        assert parameters["learning_rate"].default == rule.defaults["lr"]
        for keyword in ("state_dtype", "state_layout", "skip_nonfinite"):
            assert parameters[keyword].kind is P.KEYWORD_ONLY
        assert all(parameters[k].default == v for k, v in rule.defaults.items() if k != "lr")
        assert rule.doc in inspect.getdoc(getattr(adapter, public)).replace("\n    ", "\n")
        direction = inspect.signature(getattr(adapter, f"scale_by_{name}")).parameters
        kept = {"lr"} | ({"weight_decay", "coupled_weight_decay"} if name != "novograd" else set())
        assert list(direction) == [k for k in rule.defaults if k not in kept] + [
            "state_dtype", "state_layout", "skip_nonfinite"]
    assert list(inspect.signature(adapter.gan).parameters) == ["center", "scale", "skip_nonfinite"]
    assert inspect.signature(adapter.mvn_grad).parameters["b2"].default == 0.999
    for name in adapter.FACTORIES:
        assert getattr(adapter, name).__name__ == name
        assert isinstance(getattr(adapter, name)(), optax.GradientTransformation)


def test_hyperparameters_are_checked_when_the_transformation_is_made():
    with pytest.raises(ValueError, match="b1=1.0 is out of range"):
        adapter.mvn_grad(b1=1.0)
    with pytest.raises(ValueError, match="^learning_rate=-0.1 is out of range"):
        adapter.adam(-0.1)  # named as the caller named it
    with pytest.raises(TypeError, match="^learning_rate must be a number or a 0-d array"):
        adapter.mvn_grad(learning_rate="0.1")
    with pytest.raises(ValueError, match="b2_min=0.9 is larger"):
        adapter.maxva(b2_min=0.9, b2_max=0.5)
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        adapter.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="center="):
        adapter.gan(center="rows")
    with pytest.raises(TypeError, match="must be True or False"):
        adapter.adam(coupled_weight_decay=1)
    with pytest.raises(ValueError, match="^learning_rate must be a number or a 0-d array"):
        adapter.adam(jnp.ones(2))
    with pytest.raises(TypeError, match="weight_decay"):
        adapter.scale_by_adam(weight_decay=0.1)  # decay is not part of Adam's direction
    with pytest.raises(ValueError, match="state_layout='flat'"):
        adapter.adam(state_layout="flat")
    adapter.adam(learning_rate=lambda count: 1 / count)  # a schedule is not called here


# ---- the state and the pytrees

@pytest.mark.parametrize("layout", ["tree", "packed"])
@pytest.mark.parametrize("public", OPTIMIZERS)
def test_state_is_the_rules_named_tuple_with_buffers_shaped_like_the_params(public, layout):
    """Trees shaped like the params, or packed: one flat array per dtype of the params,
    which :meth:`Packed.tree` shows as such a tree."""
    rule = mvn_core.rules[OPTIMIZERS[public]]
    params = _tree(_problem(1).params)
    params["dense"] = params["dense"]._replace(bias=params["dense"].bias.astype(jnp.float32))
    state = getattr(adapter, public)(state_layout=layout).init(params)
    assert type(state) is rule.state_type and int(state.count) == 0
    per_tensor = "v" if public == "novograd" else None
    leaves = jax.tree.leaves(params)
    for name in state._fields[1:]:
        field = getattr(state, name)
        if layout == "packed":
            assert isinstance(field, Packed) and len(field.arrays) == 2  # float64, float32
            values = len(leaves) if name == per_tensor else sum(p.size for p in leaves)
            assert sum(a.size for a in field.arrays) == values
            field = field.tree()
        assert jax.tree.structure(field) == jax.tree.structure(params)
        assert field["block"]["conv"][1] is None
        for buffer, p in zip(jax.tree.leaves(field), jax.tree.leaves(params)):
            # NovoGrad keeps one second moment per tensor
            assert buffer.shape == (() if name == per_tensor else p.shape)
            assert buffer.dtype == (jnp.result_type(p.dtype, jnp.float32) if name == per_tensor
                                    else p.dtype)


def test_the_state_is_packed_by_default_on_one_cpu_device():
    """Where the kernel runs: it saves JAX the handling of a buffer per tensor."""
    params = _tree(_problem(1).params)
    state = adapter.mvn_grad().init(params)
    assert all(isinstance(field, Packed) for field in state[1:])
    abstract = jax.eval_shape(adapter.mvn_grad().init, params)  # as checkpointing sees it
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    leaves, treedef = jax.tree.flatten(state)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    _assert_same(jax.tree.unflatten(treedef, leaves), state)
    restored = pickle.loads(pickle.dumps(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    _assert_same(adapter.mvn_grad().update(params, restored, params),
                 adapter.mvn_grad().update(params, state, params))
    assert isinstance(adapter.gan().init(params), mvn_core.GANState)  # no buffers to pack


def _dtype_cases():
    """Every rule in float64; the narrower dtypes for MVN-Grad and NovoGrad (its second
    moment is one 0-d array per tensor).  The core's own tests cover every rule and dtype."""
    narrower = {"float32": (jnp.float32, None), "bfloat16": (jnp.bfloat16, None),
                "bfloat16-bfloat16-state": (jnp.bfloat16, jnp.bfloat16)}
    for public in OPTIMIZERS:
        yield pytest.param(public, jnp.float64, None, id=f"{public}-float64")
        if public in ("mvn_grad", "novograd"):
            yield from (pytest.param(public, *case, id=f"{public}-{label}")
                        for label, case in narrower.items())


@pytest.mark.parametrize("public,dtype,state_dtype", list(_dtype_cases()))
def test_trajectory_is_bitwise_the_rule_in_ieee_arithmetic(public, dtype, state_dtype):
    rule = mvn_core.rules[OPTIMIZERS[public]]
    hyper = _hyper(rule.name)
    problem = _problem(6)
    transformation = getattr(adapter, public)(LR, **hyper, state_dtype=state_dtype)
    params = _tree(problem.params, dtype)
    state = transformation.init(params)
    step = _optax_step(transformation)
    expected = _reference(rule.name, problem, dtype, state_dtype=state_dtype, lr=LR, **hyper)
    for grads, want in zip(problem.grads, expected):
        params, state, _ = step(params, state, _tree(grads, dtype))
        _assert_params(params, want)
    for name in state._fields[1:]:
        # by default the params' dtype, float32 for half-precision params
        wanted = state_dtype or (jnp.float32 if dtype == jnp.bfloat16 else dtype)
        if (public, name) == ("novograd", "v"):  # one number per tensor: float32 at least
            wanted = jnp.result_type(wanted, jnp.float32)
        assert all(b.dtype == wanted for b in jax.tree.leaves(getattr(state, name)))
    assert all(p.dtype == dtype for p in jax.tree.leaves(params))
    assert int(state.count) == len(problem.grads)


@pytest.mark.parametrize("public", ["mvn_grad", "novograd"])
def test_eager_steps_are_bitwise_the_rule_in_ieee_arithmetic(public):
    """NovoGrad divides by a 0-d array, which XLA multiplies by its reciprocal: eagerly
    too, the pure rule is not IEEE there, and the kernel is."""
    rule_name = OPTIMIZERS[public]
    problem = _problem(3)
    transformation = getattr(adapter, public)(LR, weight_decay=WD)
    params = _tree(problem.params)
    state = transformation.init(params)
    expected = _reference(rule_name, problem, jnp.float64, jit=False, lr=LR, weight_decay=WD)
    for grads, want in zip(problem.grads, expected):
        updates, state = transformation.update(_tree(grads), state, params)
        params = optax.apply_updates(params, updates)
        _assert_params(params, want)


def test_a_state_made_for_other_params_is_refused():
    transformation = adapter.adam(LR)
    state = transformation.init({"w": jnp.ones(3), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match="state.m is not a tree shaped like the updates"):
        transformation.update({"w": jnp.ones(3)}, state)
    with pytest.raises(ValueError, match=r"state.m\[1\] has shape \(3,\)"):
        transformation.update({"w": jnp.ones(4), "b": jnp.ones(2)}, state)


def _every_transformation():
    """Each public factory's name and its rule."""
    for name in adapter.FACTORIES:
        rule_name = OPTIMIZERS.get(name, name.removeprefix("scale_by_"))
        yield pytest.param(name, mvn_core.rules[rule_name], id=name)


@pytest.mark.parametrize("name,rule", list(_every_transformation()))
def test_a_state_of_another_rule_is_refused_with_a_type_error(name, rule):
    params = {"w": jnp.ones(3)}
    transformation = getattr(adapter, name)()
    for other in mvn_core.rules.values():
        if other is rule:
            continue
        state = other.init(jax.tree.leaves(params))
        with pytest.raises(TypeError, match=f"state was made by {other.name}_init, but "
                                            f"{rule.name}_update needs"):
            transformation.update(params, state, params)


@pytest.mark.parametrize("name,rule", list(_every_transformation()))
def test_update_takes_and_ignores_extra_arguments(name, rule):
    """As optax's GradientTransformationExtraArgs: ``value=loss`` and the like pass
    through ``optax.chain`` to every transformation."""
    params = {"w": jnp.linspace(-1, 1, 4).reshape(2, 2), "b": jnp.ones(2)}
    grads = jax.tree.map(lambda p: 0.5 * p + 0.25, params)
    transformation = getattr(adapter, name)()
    assert isinstance(transformation, optax.GradientTransformationExtraArgs)
    state = transformation.init(params)
    expected, _ = transformation.update(grads, state, params)
    got, _ = transformation.update(grads, state, params, value=jnp.asarray(1.5), step=3)
    chained = optax.chain(optax.identity(), transformation)
    via_chain, _ = chained.update(grads, chained.init(params), params, value=jnp.asarray(1.5))
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(expected), jax.tree.leaves(via_chain)):
        assert np.array_equal(a, b) and np.array_equal(c, b)


# ---- learning rates: numbers, arrays, schedules, inject_hyperparams

def test_a_schedule_is_read_at_the_count_before_the_update():
    """The first update uses ``schedule(0)``: the steps are those of the same rates
    given one by one."""
    problem = _problem(4)
    schedule = optax.piecewise_constant_schedule(0.1, {1: 0.5, 3: 0.5})
    step = _optax_step(adapter.mvn_grad(schedule))
    params = _tree(problem.params)
    state = adapter.mvn_grad(schedule).init(params)
    rates = []
    for t, grads in enumerate(problem.grads):
        by_hand = _optax_step(adapter.mvn_grad(jnp.asarray(schedule(t))))
        _, _, expected = by_hand(params, state, _tree(grads))
        params, state, updates = step(params, state, _tree(grads))
        _assert_same(updates, expected)
        rates.append(float(schedule(t)))
    assert rates == [0.1, 0.05, 0.05, 0.025]


def test_an_array_learning_rate_equals_the_same_number():
    problem = _problem(3)
    params = _tree(problem.params)
    by_number, by_array = adapter.laprop(0.05), adapter.laprop(jnp.asarray(0.05))
    s_number, s_array = by_number.init(params), by_array.init(params)
    for grads in problem.grads:
        u_number, s_number = by_number.update(_tree(grads), s_number)
        u_array, s_array = by_array.update(_tree(grads), s_array)
        _assert_same(u_array, u_number)


def test_inject_hyperparams_changes_the_rate_without_recompiling():
    """The injected values reach the rule (the steps are those of a transformation
    made with them), and changing them compiles nothing."""
    problem = _problem(5)
    transformation = optax.inject_hyperparams(adapter.mvn_grad)(learning_rate=0.1, b1=0.8)
    params = _tree(problem.params)
    state = transformation.init(params)
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    for t, grads in enumerate(problem.grads, start=1):
        for name, value in {"learning_rate": 0.1 / t, "b1": 0.8 + 0.02 * t}.items():
            state.hyperparams[name] = jnp.asarray(value, dtype=state.hyperparams[name].dtype)
        hyper = state.hyperparams
        by_hand = _optax_step(adapter.mvn_grad(hyper["learning_rate"], b1=hyper["b1"],
                                               weight_decay=hyper["weight_decay"]))
        _, _, expected = by_hand(params, state.inner_state, _tree(grads))
        params, state, updates = step(params, state, _tree(grads))
        _assert_same(updates, expected)
    assert len(traces) == 1 and step._cache_size() == 1


def test_state_dtype_by_name_under_inject_hyperparams():
    """A dtype object is callable, so optax would take it for a schedule; a name is not."""
    params = _tree(_problem(1).params, jnp.bfloat16)
    transformation = optax.inject_hyperparams(adapter.adam, hyperparam_dtype=jnp.float32)(
        learning_rate=0.1, state_dtype="float32")
    state = transformation.init(params)
    updates, state = transformation.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(b.dtype == jnp.float32 for b in jax.tree.leaves(state.inner_state)[1:])
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    # Adam's first step is -lr sign(g); b2 = 0.999 in bfloat16 would be 1 (and give NaN)
    assert updates["dense"].kernel[0, 0] == jnp.asarray(-0.1, jnp.bfloat16)


# ---- composition: chain, clipping, masks, MultiSteps, gan in front

def _weights_only(tree):
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


def test_chain_with_clipping_and_a_mask():
    rule = mvn_core.rules["adabelief"]
    problem = _problem(4)
    clip = optax.clip_by_global_norm(1.0)
    transformation = optax.chain(clip, optax.masked(adapter.adabelief(LR), _weights_only))
    params = _tree(problem.params)
    state = transformation.init(params)
    masked_state = state[1].inner_state
    assert isinstance(_as_tree(masked_state.m)["dense"].bias, optax.MaskedNode)
    kept = [i for i, p in enumerate(jax.tree.leaves(params)) if p.ndim >= 2]
    pure_state = rule.init([jax.tree.leaves(params)[i] for i in kept])
    step = _optax_step(transformation)
    pure = jax.jit(lambda s, g: rule.update(s, g, lr=LR))
    for grads in problem.grads:
        grads = _tree(grads)
        assert float(optax.tree.norm(grads)) > 1.0  # clipping is active
        clipped, _ = clip.update(grads, clip.init(params))
        params, state, updates = step(params, state, grads)
        expected, pure_state = pure(pure_state, [jax.tree.leaves(clipped)[i] for i in kept])
        for i, (u, c) in enumerate(zip(jax.tree.leaves(updates), jax.tree.leaves(clipped))):
            # optax.masked passes masked-out updates through
            _assert_close(u, expected[kept.index(i)] if i in kept else c, 1e-13)
    assert int(state[1].inner_state.count) == 4


def test_nothing_to_optimize_leaves_a_state_of_the_count_alone():
    """A label of ``optax.multi_transform`` that matches no parameter (its transformation
    sees every leaf masked out) is legal in optax."""
    params = _tree(_problem(1).params)
    labels = jax.tree.map(lambda _: "all", params)
    transformation = optax.multi_transform(
        {"all": adapter.sgd(0.5), "unused": adapter.mvn_grad()}, labels)
    state = transformation.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(transformation.update)(grads, state, params)
    _assert_same(updates, jax.tree.map(lambda g: -0.5 * g, grads))
    unused = state.inner_states["unused"].inner_state
    assert type(unused) is mvn_core.MVNState and int(unused.count) == 1
    assert jax.tree.leaves(unused.m) == []


def test_multi_steps_accumulates_then_steps_as_the_rule():
    rule = mvn_core.rules["adam"]
    problem = _problem(6)
    transformation = optax.MultiSteps(adapter.adam(LR, weight_decay=WD), every_k_schedule=3,
                                      accumulator_dtype=jnp.float64)  # float32 by default
    params = _tree(problem.params)
    state = transformation.init(params)
    flat = [np.asarray(p) for p in jax.tree.leaves(params)]
    pure_state = rule.init(flat)
    step = jax.jit(transformation.update)
    for t, grads in enumerate(problem.grads, start=1):
        updates, state = step(_tree(grads), state, params)
        if t % 3:
            assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
            continue
        window = [jax.tree.leaves(_tree(g)) for g in problem.grads[t - 3:t]]
        mean = [np.mean([np.asarray(g[i]) for g in window], axis=0) for i in range(len(flat))]
        expected, pure_state = rule.update(pure_state, mean, flat, lr=LR, weight_decay=WD)
        for u, e in zip(jax.tree.leaves(updates), expected):
            _assert_close(u, e, 1e-12)
        params = optax.apply_updates(params, updates)
        flat = mvn_core.apply_updates(flat, expected)
    assert int(state.inner_opt_state.count) == 2


def test_gan_in_front_of_sgd_with_momentum():
    """SGD takes GAN's output: its steps are the rule in IEEE arithmetic (SGD on NumPy)
    from GAN's jitted output."""
    gan, sgd = mvn_core.rules["gan"], mvn_core.rules["sgd"]
    problem = _problem(4)
    transformation = optax.chain(adapter.gan(center="channel"), adapter.sgd(0.1, momentum=0.9))
    params = _tree(problem.params)
    state = transformation.init(params)
    flat = [np.asarray(p) for p in jax.tree.leaves(params)]
    gan_state, sgd_state = gan.init(jax.tree.leaves(params)), sgd.init(flat)
    gan_step = jax.jit(lambda state, grads: gan.update(state, grads, center="channel"))
    step = _optax_step(transformation)
    for grads in problem.grads:
        params, state, updates = step(params, state, _tree(grads))
        g_hat, gan_state = gan_step(gan_state, jax.tree.leaves(_tree(grads)))
        expected, sgd_state = sgd.update(sgd_state, [np.asarray(g) for g in g_hat], flat,
                                         lr=0.1, momentum=0.9)
        _assert_same(updates, expected)
        flat = mvn_core.apply_updates(flat, expected)
    assert type(state[0]) is mvn_core.GANState and int(state[0].count) == 4


@pytest.mark.parametrize("name", [n for n in mvn_core.rules if n != "gan"])
def test_scale_by_then_the_learning_rate_is_the_optimizer(name):
    public = {v: k for k, v in OPTIMIZERS.items()}[name]
    hyper = {"momentum": 0.9} if name == "sgd" else {"weight_decay": WD} if name == "novograd" else {}
    problem = _problem(4)
    chained = optax.chain(getattr(adapter, f"scale_by_{name}")(**hyper),
                          optax.scale_by_learning_rate(LR))
    whole = getattr(adapter, public)(LR, **hyper)
    params = _tree(problem.params, jnp.float32)
    states = chained.init(params), whole.init(params)
    steps = _optax_step(chained), _optax_step(whole)
    for grads in problem.grads:
        grads = _tree(grads, jnp.float32)
        params_c, chained_state, updates_c = steps[0](params, states[0], grads)
        params_w, whole_state, updates_w = steps[1](params, states[1], grads)
        _assert_same(updates_c, updates_w)
        params, states = params_w, (chained_state, whole_state)
    _assert_same(states[0][0], states[1])


def test_jit_with_donated_params_and_state():
    problem = _problem(4)
    transformation = adapter.novograd(LR, weight_decay=WD)
    params = _tree(problem.params, jnp.float32)
    state = transformation.init(params)
    plain = _optax_step(transformation)
    donating = jax.jit(plain.__wrapped__, donate_argnums=(0, 1))
    expected_params, expected_state = params, state
    compiled = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Some donated buffers were not usable" fails
        for grads in problem.grads:
            grads = _tree(grads, jnp.float32)
            expected_params, expected_state, _ = plain(expected_params, expected_state, grads)
            old_m = jax.tree.leaves(state.m)[0]
            params, state, _ = donating(params, state, grads)
            assert old_m.is_deleted()
            compiled.append(donating._cache_size())
    _assert_same(params, expected_params)
    _assert_same(state, expected_state)
    # One compilation: the state keeps its types from step to step, and the core makes
    # it exactly as committed to a device as the params are (uncommitted here).
    assert compiled == [1] * len(compiled)


@pytest.mark.parametrize("committed", [False, True])
def test_first_step_compiles_once(committed):
    """Params straight from jnp (uncommitted) or from a jit or device_put (committed):
    the state follows them, so the second step finds the first step's compilation.
    (optax's own init makes an uncommitted count, which costs committed params a
    second compilation.)"""
    params = _tree(_problem(1).params, jnp.float32)
    if committed:
        params = jax.device_put(params, jax.devices()[0])
    transformation = adapter.novograd(LR, weight_decay=WD)  # 0-d buffers as well as full ones
    step = jax.jit(_optax_step(transformation).__wrapped__)
    state = transformation.init(params)
    for grads in _problem(3).grads:
        params, state, _ = step(params, state, _tree(grads, jnp.float32))
    assert step._cache_size() == 1


SHARDED = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from mvn_core.adapters import optax as adapter
mesh = Mesh(np.array(jax.devices()), ("x",))
split, replicated = NamedSharding(mesh, PartitionSpec("x")), NamedSharding(mesh, PartitionSpec())
params = {"w": jax.device_put(jnp.linspace(-1, 1, 8).reshape(4, 2), split),
          "b": jax.device_put(jnp.ones(3), replicated)}
grads = jax.tree.map(lambda p: 0.5 * p + 1, params)
transformation = adapter.mvn_grad(0.1, weight_decay=0.1)
same = lambda a, b: a.sharding.is_equivalent_to(b.sharding, b.ndim)
laid_out_as_params = lambda *trees: all(same(a, p) for t in trees for a, p in zip(jax.tree.leaves(t), jax.tree.leaves(params)))
state = transformation.init(params)
updates, state = transformation.update(grads, state, params)
print(laid_out_as_params(updates, state.m, state.v))
jitted, jitted_state = jax.jit(transformation.update)(grads, state, params)
print(laid_out_as_params(jitted, jitted_state.m, jitted_state.v))
local = lambda tree: jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.devices()[0]), tree)
u3, _ = transformation.update(local(grads), transformation.init(local(params)), local(params))
print(all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(u3))))
"""


def test_params_sharded_over_two_devices():
    """Weights split over two devices and replicated biases: the state buffers are laid
    out as the params, eagerly and under jax.jit."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True"] * 3


# ---- the same mathematics in optax

PEERS = {
    "adam": (lambda: adapter.adam(LR, 0.9, 0.999, 1e-8),
             lambda: optax.adam(LR, 0.9, 0.999, eps=1e-8, eps_root=0.0)),
    "adamw": (lambda: adapter.adam(LR, 0.9, 0.999, 1e-8, weight_decay=WD),
              lambda: optax.adamw(LR, 0.9, 0.999, eps=1e-8, eps_root=0.0, weight_decay=WD)),
    "novograd": (lambda: adapter.novograd(LR, 0.95, 0.98, 1e-8, weight_decay=WD),
                 lambda: optax.novograd(LR, 0.95, 0.98, eps=1e-8, eps_root=0.0,
                                        weight_decay=WD)),
    "adabelief": (lambda: adapter.adabelief(LR, 0.9, 0.999, 1e-16, weight_decay=WD),
                  lambda: optax.chain(optax.scale_by_belief(0.9, 0.999, eps=1e-16, eps_root=1e-16),
                                      optax.add_decayed_weights(WD),
                                      optax.scale_by_learning_rate(LR))),
    "sgd": (lambda: adapter.sgd(LR, momentum=0.9),
            lambda: optax.sgd(LR, momentum=0.9)),
    "sgd-nesterov": (lambda: adapter.sgd(LR, momentum=0.9, nesterov=True),
                     lambda: optax.sgd(LR, momentum=0.9, nesterov=True)),
}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("peer", PEERS)
def test_agrees_with_optax(peer, dtype):
    """Each step's update, per tensor, within the sum of both runs' rounding bounds, in
    ulps of the update's size.  Ours is ``kappa(t)`` of the project's rounding model
    (it grows with the memory of the averages: 76 for Adam at step 50); optax's is the
    same plus what its bias corrections ``1 - b**t`` lose to cancellation."""
    rule = peer.split("-")[0].replace("adamw", "adam")
    ours, theirs = (make() for make in PEERS[peer])
    hyper = dict(mvn_core.rules[rule].defaults, momentum=0.9)
    eps = float(jnp.finfo(dtype).eps)
    problem = _problem(50, seed=9)
    runs = []
    for transformation in (ours, theirs):
        params = _tree(problem.params, dtype)
        state, step, updates = transformation.init(params), _optax_step(transformation), []
        for grads in problem.grads:
            params, state, u = step(params, state, _tree(grads, dtype))
            updates.append([np.asarray(a) for a in jax.tree.leaves(u)])
        runs.append(updates)
    for t, (mine, peers) in enumerate(zip(*runs), start=1):
        for i, (a, b) in enumerate(zip(mine, peers)):
            if b.size == 0:
                continue
            ulps = 2 * tolerance.kappa(rule, hyper, t, b.size) + _optax_bias_correction(rule, t)
            assert np.max(np.abs(a - b)) <= ulps * eps * np.max(np.abs(b)), f"step {t}, tensor {i}"


def _optax_bias_correction(rule, t, b1=0.9, b2=0.999):
    """The relative error, in ulps, of optax's ``1 - b**t``: ``b**t`` is a few (2) ulps off,
    and the subtraction multiplies that by ``b**t / (1 - b**t)`` (500 for ``b2**2``).
    The second moment's correction enters through a square root, which halves it.
    (Ours is computed as ``-expm1(t log b)``, accurate to a few ulps.)"""
    if rule not in ("adam", "adabelief"):
        return 0.0
    def lost(b):
        return 2 * b ** t / (1 - b ** t)
    return lost(b1) + lost(b2) / 2


def test_mvn_variance_is_optax_belief_second_moment():
    """docs/algorithms.md: MVN-Grad's ``v`` is ``scale_by_belief(b1, b2, eps=0, eps_root=eps_s)``'s."""
    problem = _problem(5)
    ours, belief = adapter.scale_by_mvn(), optax.scale_by_belief(0.9, 0.999, eps=0.0, eps_root=1e-16)
    params = _tree(problem.params)
    s_ours, s_belief = ours.init(params), belief.init(params)
    for grads in problem.grads:
        _, s_ours = ours.update(_tree(grads), s_ours)
        _, s_belief = belief.update(_tree(grads), s_belief)
    _assert_same(_as_tree(s_ours.m), s_belief.mu)
    _assert_same(_as_tree(s_ours.v), s_belief.nu)
