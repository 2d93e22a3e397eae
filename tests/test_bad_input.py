"""Bad input gets a clear error naming the problem, and leaves the state as it was."""

from __future__ import annotations

import re

import numpy as np
import pytest

import mvn_core

RULES = list(mvn_core.rules)
OPTIMIZERS = [name for name, rule in mvn_core.rules.items() if rule.kind == "optimizer"]


def _params():
    return [np.ones((3, 2)), np.zeros(4)]


def _grads():
    return [np.full((3, 2), 0.5), np.arange(4.0)]


@pytest.fixture(params=RULES)
def rule(request):
    return mvn_core.rules[request.param]


def _snapshot(state):
    return [np.array(a, copy=True) for f in state for a in (f if isinstance(f, tuple) else (f,))]


def _refused(rule, error, match, state=None, grads=None, params=None, **hyper):
    """Assert the call fails as described, and that the state is untouched and usable."""
    state = rule.init(_params()) if state is None else state
    before = _snapshot(state)
    with pytest.raises(error, match=match):
        rule.update(state, _grads() if grads is None else grads, params, **hyper)
    for a, b in zip(before, _snapshot(state)):
        np.testing.assert_array_equal(a, b)
    if type(state) is rule.state_type:
        rule.update(state, _grads(), _params())  # still a valid state


@pytest.mark.parametrize("name", OPTIMIZERS)  # GAN's state holds nothing per tensor
def test_grads_of_another_length(name):
    _refused(mvn_core.rules[name], ValueError, r"state\.\w+ holds 2 arrays but grads has 1",
             grads=[np.ones((3, 2))])


def test_grads_and_params_differ_in_structure(rule):
    _refused(rule, ValueError, "params has 1 array but grads has 2", params=[np.ones((3, 2))])
    _refused(rule, ValueError, "params is one array but grads is a sequence",
             params=np.ones((3, 2)))


def test_shapes_differ(rule):
    _refused(rule, ValueError, r"params\[1\] has shape \(5,\)",
             params=[np.ones((3, 2)), np.zeros(5)])


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS])
def test_state_of_other_shapes(name):
    rule = mvn_core.rules[name]
    state = rule.init([np.ones((3, 2)), np.zeros(5)])
    with pytest.raises(ValueError, match=r"state\.\w+\[1\] has shape \(5,\)|must be 0-d"):
        rule.update(state, _grads())


def test_state_of_another_rule(rule):
    other = mvn_core.rules["adam" if rule.name != "adam" else "mvn"]
    _refused(rule, TypeError, f"made by {other.name}_init.*needs the {rule.state_type.__name__}",
             state=other.init(_params()))


def test_plain_tuple_is_not_a_state(rule):
    with pytest.raises(TypeError, match="state is a tuple"):
        rule.update(tuple(rule.init(_params())), _grads())


@pytest.mark.parametrize("bad", [np.arange(4), np.ones(4, dtype=bool),
                                 np.ones(4, dtype=np.complex128)], ids=["int", "bool", "complex"])
def test_non_floating_grads(rule, bad):
    _refused(rule, TypeError, r"grads\[1\] has dtype .*real floating",
             grads=[np.full((3, 2), 0.5), bad])


def test_integer_params_at_init(rule):
    with pytest.raises(TypeError, match=r"params\[0\] has dtype int"):
        rule.init([np.arange(3)])


def test_empty_params_at_init(rule):
    with pytest.raises(ValueError, match="params is empty"):
        rule.init([])


def test_not_arrays(rule):
    with pytest.raises(TypeError, match=r"grads\[0\] is a list, not an array"):
        rule.update(rule.init(_params()), [[0.5, 0.5], np.zeros(4)])
    with pytest.raises(TypeError, match="grads is a float"):
        rule.update(rule.init(_params()), 0.5)


def test_mixed_namespaces(rule):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="different array libraries were mixed"):
        rule.update(rule.init(_params()), [torch.ones(3, 2), np.zeros(4)])
    with pytest.raises(TypeError, match="different array libraries were mixed"):
        rule.update(rule.init(_params()), _grads(), [torch.ones(3, 2), torch.zeros(4)])


def test_mixed_devices(rule):
    xp = pytest.importorskip("array_api_strict")
    here, there = xp.Device("CPU_DEVICE"), xp.Device("device1")
    params = [xp.ones((3, 2), device=here), xp.zeros(4, device=there)]
    with pytest.raises(ValueError, match=r"params\[1\] is on device .*device1.* but params\[0\]"):
        rule.init(params)
    state = rule.init([xp.ones((3, 2), device=here), xp.zeros(4, device=here)])
    with pytest.raises(ValueError, match=r"grads\[1\] is on device"):
        rule.update(state, params)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_needs_params(name):
    rule = mvn_core.rules[name]
    _refused(rule, ValueError, "weight_decay=0.1 but no params", weight_decay=0.1)


OUT_OF_RANGE = [("lr", -1e-3), ("lr", float("nan")), ("lr", float("inf")), ("eps", -1.0),
                ("eps", 0.0), ("eps", 1e-46), ("eps", 2.0 ** -126), ("eps", 5e-20),
                # beyond float32, the narrowest dtype a step computes in: Inf * 0 is NaN
                ("lr", 1e39), ("eps", 1e39), ("eps_s", 1e39), ("weight_decay", 1e39),
                ("eps_s", -1e-16), ("weight_decay", -0.1), ("b1", 1.0), ("b1", -0.1),
                ("b2", 1.5), ("b2_min", 1.0), ("b2_max", -0.5), ("momentum", 1.0)]


@pytest.mark.parametrize("name,value", OUT_OF_RANGE, ids=[f"{n}={v}" for n, v in OUT_OF_RANGE])
def test_hyperparameter_out_of_range(name, value):
    owners = [r for r in mvn_core.rules.values() if name in r.defaults]
    assert owners
    for rule in owners:
        _refused(rule, ValueError, f"{name}={re.escape(repr(value))} is out of range",
                 params=_params(), **{name: value})


def test_the_smallest_and_largest_numbers_in_range_are_taken():
    rule = mvn_core.rules["mvn"]
    state = rule.init(_params())
    rule.update(state, _grads(), _params(), eps=2.0 ** -64, eps_s=0.0, lr=3.4e38,
                weight_decay=3.4e38)


@pytest.mark.parametrize("name", ["lr", "weight_decay", "eps"])
def test_an_integer_beyond_every_float_is_out_of_range(name):
    """Not Python's OverflowError: the range check's ValueError."""
    rule = mvn_core.rules["adam"]
    _refused(rule, ValueError, f"{name} \\(an integer of 401 digits\\) is out of range",
             params=_params(), **{name: 10 ** 400})


def test_b2_min_above_b2_max():
    _refused(mvn_core.rules["maxva"], ValueError, "b2_min=0.9 is larger than b2_max=0.8",
             b2_min=0.9, b2_max=0.8)


def test_nesterov_without_momentum():
    _refused(mvn_core.rules["sgd"], ValueError, "nesterov=True needs momentum > 0", nesterov=True)


@pytest.mark.parametrize("value,error,match", [
    (np.ones(2), ValueError, r"lr must be a number or a 0-d array, got an array of shape \(2,\)"),
    ("0.1", TypeError, "lr must be a number or a 0-d array, got a str"),
    (True, TypeError, "lr must be a number or a 0-d array, got True"),
    (np.asarray(1 + 1j), TypeError, "lr has dtype complex"),
], ids=["vector", "string", "bool", "complex"])
@pytest.mark.parametrize("name", OPTIMIZERS)  # GAN takes no learning rate
def test_hyperparameter_of_wrong_kind(name, value, error, match):
    _refused(mvn_core.rules[name], error, match, lr=value)


def test_flags_must_be_bools():
    _refused(mvn_core.rules["sgd"], TypeError, "nesterov must be True or False",
             momentum=0.9, nesterov=1)


@pytest.mark.parametrize("dtype,error,match", [
    ("int32", TypeError, "state_dtype='int32' is not a real floating dtype"),
    ("sum", TypeError, "state_dtype='sum' is not a real floating dtype"),  # a function of xp
    ("float99", ValueError, "state_dtype='float99' is not a dtype of"),
    (np.int64, TypeError, "not a real floating dtype"),
])
def test_bad_state_dtype(rule, dtype, error, match):
    with pytest.raises(error, match=match):
        rule.init(_params(), state_dtype=dtype)


def test_apply_updates_checks_structure():
    with pytest.raises(ValueError, match="params has 2 arrays but updates has 1"):
        mvn_core.apply_updates(_params(), _grads()[:1])
    with pytest.raises(ValueError, match=r"updates\[1\] has shape \(3,\)"):
        mvn_core.apply_updates(_params(), [np.ones((3, 2)), np.ones(3)])


@pytest.mark.parametrize("bad", [np.array([1 + 2j]), np.array([1]), np.array([True])],
                         ids=["complex", "int", "bool"])
def test_apply_updates_checks_the_updates_dtype(bad):
    """A complex update would lose its imaginary part in a real parameter."""
    with pytest.raises(TypeError, match=r"updates\[0\] has dtype .*real floating"):
        mvn_core.apply_updates([np.zeros(1)], [bad])


def test_state_fields_that_are_not_tuples_of_arrays(rule):
    state = rule.init(_params())
    broken = state._replace(**{state._fields[-1]: list(state[-1])})
    with pytest.raises(TypeError, match=f"state.{state._fields[-1]} is a list"):
        rule.update(broken, _grads(), _params())
    if len(state) > 1 and state[-1]:
        broken = state._replace(**{state._fields[-1]: (0.0,) + state[-1][1:]})
        with pytest.raises(TypeError, match=f"state.{state._fields[-1]}\\[0\\] is a float"):
            rule.update(broken, _grads(), _params())


@pytest.mark.parametrize("elsewhere", ["state", "lr"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_or_array_hyperparameter_on_another_device(name, elsewhere):
    xp = pytest.importorskip("array_api_strict")
    rule = mvn_core.rules[name]
    here, there = xp.Device("CPU_DEVICE"), xp.Device("device1")
    params = [xp.ones((3, 2), device=here)]
    state = rule.init([xp.ones((3, 2), device=there if elsewhere == "state" else here)])
    lr = xp.asarray(0.1, device=there if elsewhere == "lr" else here)
    with pytest.raises(ValueError,
                       match=r"(state\.\w+|lr) is on device .*device1.* but grads\[0\]"):
        rule.update(state, params, params, lr=lr)


def test_a_torch_cpu_scalar_hyperparameter_is_taken_with_any_device():
    """PyTorch computes with a 0-d CPU tensor on any device, as with a number; the check
    lets it through (here beside meta tensors, the device every build has)."""
    torch = pytest.importorskip("torch")
    params = [torch.ones(3, device="meta")]
    state = mvn_core.adam_init(params)
    updates, _ = mvn_core.adam_update(state, params, params, lr=torch.tensor(0.1))
    assert updates[0].device.type == "meta"
    with pytest.raises(ValueError, match="lr is on device meta but grads"):
        mvn_core.adam_update(mvn_core.adam_init([torch.ones(3)]), [torch.ones(3)],
                             lr=torch.tensor(0.1, device="meta"))
