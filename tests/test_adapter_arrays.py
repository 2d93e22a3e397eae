"""mvn_core.adapters.arrays: in-place optimizers over NumPy (and CuPy) arrays.

The optimizers hold no mathematics of their own, so every trajectory is compared
with the pure rule's bit for bit, not within a tolerance.
"""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys

import numpy as np
import pytest

import mvn_core
from mvn_core import backends
from mvn_core.adapters import arrays
from mvn_core.conformance.problems import make_problem

NAMES = [name for name, rule in mvn_core.rules.items() if rule.kind == "optimizer"]
# Each rule's first checked setting (SGD's: momentum, which keeps state), lr and decay set.
HYPER = {name: dict((mvn_core.rules[name].settings or ({},))[0], lr=0.01, weight_decay=0.01)
         for name in NAMES}
STEPS = 12
CUPY_MISSING = backends.get("cupy").unavailable_reason()
needs_cupy = pytest.mark.skipif(CUPY_MISSING is not None, reason=f"CuPy: {CUPY_MISSING}")


def _problem(dtype, steps=STEPS, seed=0):
    """Params (0-d, empty, 1-d, 2-d, 4-d) and per-step gradients, in ``dtype``."""
    problem = make_problem(steps, seed)
    params = [p.astype(dtype) for p in problem.params]
    return params, [[g.astype(dtype) for g in grads] for grads in problem.grads]


def _copies(params):
    return [p.copy() for p in params]


def _pure_run(name, params, grad_steps, hypers, gan=None, state_dtype=None):
    """The pure functions' trajectory: ``(params, state)`` after each step."""
    rule = mvn_core.rules[name]
    state = rule.init(params, state_dtype=state_dtype)
    gan_state = None if gan is None else mvn_core.gan_init(params)
    out = []
    for grads, hyper in zip(grad_steps, hypers):
        if gan is not None:
            grads, gan_state = mvn_core.gan_update(gan_state, grads, **gan)
        updates, state = rule.update(state, grads, params, **hyper)
        params = mvn_core.apply_updates(params, updates)
        out.append((params, state))
    return out


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _assert_identical(actual, expected):
    """Same length, and each pair of arrays equal bit for bit (dtype and shape too)."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        a, e = _host(a), _host(e)
        assert (a.dtype, a.shape) == (e.dtype, e.shape)
        assert a.tobytes() == e.tobytes()


def _leaves(state):
    return [a for field in state for a in (field if isinstance(field, tuple) else (field,))]


def _assert_same_tree(a, b):
    """Two state_dicts (or parts of them) equal: arrays bit for bit, the rest by ==."""
    if isinstance(a, np.ndarray):
        _assert_identical([a], [b])
    elif isinstance(a, (dict, list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            a, b = list(a.values()), [b[k] for k in a]
        for x, y in zip(a, b):
            _assert_same_tree(x, y)
    else:
        assert a == b


def _snapshot(opt):
    """Copies of the params and of the state (the rule's and GAN's)."""
    saved = opt.state_dict()
    return _copies(opt.params), saved["state"], saved["gan"] and saved["gan"]["state"]


def _assert_unchanged(opt, snapshot):
    _assert_identical(opt.params, snapshot[0])
    _assert_same_tree(_snapshot(opt)[1:], snapshot[1:])


def _trained(name, steps=3, **options):
    """An optimizer over two small params after ``steps`` steps, and its grads."""
    rng = np.random.default_rng(5)
    params = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    grads = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    opt = arrays.OPTIMIZERS[name](params, **{**HYPER[name], **options})
    for _ in range(steps):
        opt.step(grads)
    return opt, grads


# The classes


def test_one_generated_class_per_optimizer_rule():
    assert list(arrays.OPTIMIZERS) == NAMES
    for name, cls in arrays.OPTIMIZERS.items():
        assert cls.rule is mvn_core.rules[name]
        assert issubclass(cls, arrays.ArrayOptimizer)
        assert getattr(arrays, cls.__name__) is cls and cls.__name__ in arrays.__all__
        # generated, not hand-written: the class adds nothing but its rule and docs
        assert set(vars(cls)) <= {"rule", "__doc__", "__module__", "__qualname__", "__signature__"}
    assert [c.__name__ for c in arrays.OPTIMIZERS.values()] == [
        mvn_core.rules[name].class_name for name in NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_signature_and_doc_show_the_rules_hyperparameters(name):
    cls, rule = arrays.OPTIMIZERS[name], mvn_core.rules[name]
    parameters = inspect.signature(cls).parameters
    assert list(parameters)[:5] == ["params", "gan", "state_dtype", "fused", "skip_nonfinite"]
    assert {k: p.default for k, p in list(parameters.items())[5:]} == dict(rule.defaults)
    assert rule.title in cls.__doc__ and rule.doc in cls.__doc__
    opt = cls([np.ones(2)])
    assert opt.hyperparameters == dict(rule.defaults) and opt.gan is None
    assert repr(opt).startswith(f"{cls.__name__}(1 numpy arrays, lr=")


def test_gan_and_the_generic_class_are_not_optimizers():
    with pytest.raises(ValueError, match="gan is a gradient transform"):
        arrays.optimizer_class("gan")
    with pytest.raises(TypeError, match="ArrayOptimizer is generic"):
        arrays.ArrayOptimizer([np.ones(2)])


def test_optimizer_class_accepts_a_rule_record():
    cls = arrays.optimizer_class(mvn_core.rules["adam"], "MyAdam")
    assert cls.__name__ == "MyAdam" and cls.rule is mvn_core.rules["adam"]


# Steps: the pure rule's arithmetic, in place


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_trajectory_equals_the_pure_rule_bit_for_bit(name, dtype):
    params, grad_steps = _problem(dtype)
    opt = arrays.OPTIMIZERS[name](_copies(params), **HYPER[name])
    expected = _pure_run(name, params, grad_steps, [HYPER[name]] * STEPS)
    for grads, (want, state) in zip(grad_steps, expected):
        opt.step(grads)
        _assert_identical(opt.params, want)
    _assert_identical(_leaves(opt.state), _leaves(state))
    assert int(opt.state.count) == STEPS


@pytest.mark.parametrize("name", NAMES)
def test_step_writes_into_the_callers_arrays(name):
    flat = np.zeros(16)  # two params that are views of one buffer
    views = [flat[:10], flat[10:].reshape(2, 3)]
    ids = [id(v) for v in views]
    opt = arrays.OPTIMIZERS[name](views, **HYPER[name])
    grads = [np.linspace(-1, 1, 10), np.ones((2, 3))]
    opt.step(grads)
    assert [id(p) for p in opt.params] == ids and opt.params[0] is views[0]
    (want, _), = _pure_run(name, [np.zeros(10), np.zeros((2, 3))], [grads], [HYPER[name]])
    _assert_identical([flat], [np.concatenate([w.ravel() for w in want])])
    assert np.all(flat != 0.0)  # every coordinate under the views moved


@pytest.mark.parametrize("name", NAMES)
def test_0d_and_empty_params(name):
    params = [np.asarray(0.5), np.zeros((0, 3)), np.zeros(0, dtype=np.float32)]
    held = list(params)
    grads = [np.asarray(2.0), np.zeros((0, 3)), np.zeros(0, dtype=np.float32)]
    opt = arrays.OPTIMIZERS[name](params, **HYPER[name])
    opt.step(grads)
    opt.step(grads)
    assert all(p is h for p, h in zip(opt.params, held))
    assert held[0].shape == () and held[0] < 0.5
    want, _ = _pure_run(name, params=[np.asarray(0.5), np.zeros((0, 3)), np.zeros(0, np.float32)],
                        grad_steps=[grads] * 2, hypers=[HYPER[name]] * 2)[-1]
    _assert_identical(held, want)


@pytest.mark.parametrize("name", NAMES)
def test_grads_of_another_dtype_are_added_as_apply_updates_adds_them(name):
    # float64 grads give float64 updates: each is rounded to float32 before the sum,
    # as apply_updates does, not summed in float64 and rounded after
    params, grad_steps = _problem("float32", seed=3)
    grad_steps = [[g.astype(np.float64) / 3 for g in grads] for grads in grad_steps]
    opt = arrays.OPTIMIZERS[name](_copies(params), **HYPER[name])
    for grads in grad_steps:
        opt.step(grads)
    want, _ = _pure_run(name, params, grad_steps, [HYPER[name]] * STEPS)[-1]
    _assert_identical(opt.params, want)


@pytest.mark.parametrize("name", NAMES)
def test_state_dtype_goes_to_the_rule(name):
    params, grad_steps = _problem("float32")
    opt = arrays.OPTIMIZERS[name](_copies(params), state_dtype="float64", **HYPER[name])
    assert all(b.dtype == np.float64 for b in _leaves(opt.state)[1:])
    expected = _pure_run(name, params, grad_steps, [HYPER[name]] * STEPS, state_dtype="float64")
    for grads in grad_steps:
        opt.step(grads)
    want, state = expected[-1]
    _assert_identical(opt.params, want)
    _assert_identical(_leaves(opt.state), _leaves(state))
    assert all(p.dtype == np.float32 for p in opt.params)


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_may_change_between_steps(name):
    params, grad_steps = _problem("float64")
    hypers = [{**HYPER[name], "lr": 0.02 * 0.7 ** t} for t in range(STEPS)]
    opt = arrays.OPTIMIZERS[name](_copies(params), **HYPER[name])
    for grads, hyper in zip(grad_steps, hypers):
        opt.hyperparameters["lr"] = hyper["lr"]
        opt.step(grads)
    want, _ = _pure_run(name, params, grad_steps, hypers)[-1]
    _assert_identical(opt.params, want)
    constant, _ = _pure_run(name, params, grad_steps, [HYPER[name]] * STEPS)[-1]
    assert not np.array_equal(opt.params[3], constant[3])  # the schedule did change the run


def test_learning_rate_may_be_a_0d_array():
    params, grad_steps = _problem("float32")
    opt = arrays.Adam(_copies(params), lr=np.asarray(0.01, dtype=np.float32))
    for grads in grad_steps:
        opt.step(grads)
    hypers = [{"lr": np.asarray(0.01, np.float32)}] * STEPS
    want, _ = _pure_run("adam", params, grad_steps, hypers)[-1]
    _assert_identical(opt.params, want)


@pytest.mark.parametrize("change, error, match", [
    ({"b2": 1.5}, ValueError, r"b2=1.5 is out of range"),
    ({"lr": -0.1}, ValueError, r"lr=-0.1 is out of range"),
    ({"lr": np.ones(2)}, ValueError, r"lr must be a number or a 0-d array"),
    ({"momentum": 0.9}, TypeError, r"mvn has no hyperparameter 'momentum'"),
    ({"coupled_weight_decay": 1}, TypeError, r"coupled_weight_decay must be True or False"),
])
def test_a_bad_hyperparameter_fails_at_the_next_step_and_changes_nothing(change, error, match):
    params, grad_steps = _problem("float64")
    opt = arrays.MVNGrad(_copies(params), gan=True, **HYPER["mvn"])
    opt.step(grad_steps[0])
    snapshot = _snapshot(opt)
    good = dict(opt.hyperparameters)
    opt.hyperparameters.update(change)
    with pytest.raises(error, match=match):
        opt.step(grad_steps[1])
    _assert_unchanged(opt, snapshot)  # GAN's count did not move either
    opt.hyperparameters.clear()
    opt.hyperparameters.update(good)
    for grads in grad_steps[1:]:
        opt.step(grads)
    want, _ = _pure_run("mvn", params, grad_steps, [HYPER["mvn"]] * STEPS, gan={})[-1]
    _assert_identical(opt.params, want)


def test_a_rule_that_raises_after_gan_leaves_gans_state_as_it_was():
    """A 0-d learning rate of another library passes the hyperparameter check (it reads
    no values) and is refused by the rule's update, after GAN has run."""
    xp = pytest.importorskip("array_api_strict")
    opt, grads = _trained("mvn", gan=True)
    snapshot = _snapshot(opt)
    opt.hyperparameters["lr"] = xp.asarray(0.01)
    with pytest.raises(TypeError, match="arrays of different array libraries were mixed"):
        opt.step(grads)
    _assert_unchanged(opt, snapshot)


def test_a_bad_gan_option_fails_at_the_next_step_and_changes_nothing():
    opt, grads = _trained("adam", gan=True)
    snapshot = _snapshot(opt)
    opt.gan["center"] = "rows"
    with pytest.raises(ValueError, match="center='rows'"):
        opt.step(grads)
    _assert_unchanged(opt, snapshot)


# GAN in front of a rule


@pytest.mark.parametrize("gan", [True, {"center": "channel"}, {"scale": "none"}],
                         ids=["defaults", "channel", "no-scale"])
@pytest.mark.parametrize("name", NAMES)
def test_gan_option_is_gan_update_then_the_rule(name, gan):
    params, grad_steps = _problem("float32")
    opt = arrays.OPTIMIZERS[name](_copies(params), gan=gan, **HYPER[name])
    options = {} if gan is True else gan
    assert opt.gan == {**mvn_core.rules["gan"].defaults, **options}
    for grads in grad_steps:
        opt.step(grads)
    want, state = _pure_run(name, params, grad_steps, [HYPER[name]] * STEPS, gan=options)[-1]
    _assert_identical(opt.params, want)
    _assert_identical(_leaves(opt.state), _leaves(state))
    assert int(opt.gan_state.count) == STEPS
    plain, _ = _pure_run(name, params, grad_steps, [HYPER[name]] * STEPS)[-1]
    assert not np.array_equal(opt.params[4], plain[4])  # GAN did transform the 2-d grads


# Bad input


GRADS = [np.ones((3, 2)), np.ones(4)]


@pytest.mark.parametrize("grads, error, match", [
    (GRADS[:1], ValueError, r"params has 2 arrays but grads has 1"),
    (GRADS + [np.ones(1)], ValueError, r"params has 2 arrays but grads has 3"),
    ([GRADS[0], np.ones(5)], ValueError, r"params\[1\] has shape \(4,\) but grads\[1\] has shape"),
    ([GRADS[0], np.ones(4, dtype=int)], TypeError, r"grads\[1\] has dtype int"),
    ([GRADS[0], 1.0], TypeError, r"grads\[1\] is a float, not an array"),
    (GRADS[0], ValueError, r"grads is one array but params is a sequence"),
    (None, TypeError, r"grads is a NoneType"),
], ids=["fewer", "more", "shape", "integer", "not-array", "one-array", "none"])
@pytest.mark.parametrize("gan", [False, True], ids=["plain", "gan"])
def test_bad_grads_raise_the_cores_error_and_change_nothing(grads, error, match, gan):
    opt, _ = _trained("mvn", gan=gan)
    snapshot = _snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step(grads)
    _assert_unchanged(opt, snapshot)


def test_a_param_made_read_only_after_construction_stops_the_step_before_any_write():
    opt, grads = _trained("adam")
    snapshot = _snapshot(opt)
    opt.params[1].setflags(write=False)
    with pytest.raises(ValueError, match=r"params\[1\] is a read-only NumPy array"):
        opt.step(grads)
    _assert_unchanged(opt, snapshot)


@pytest.mark.parametrize("make, error, match", [
    (lambda: arrays.Adam([np.ones(2)], b1=1.0), ValueError, r"b1=1.0 is out of range"),
    (lambda: arrays.Adam([np.ones(2)], momentum=0.9), TypeError, r"adam has no hyperparameter"),
    (lambda: arrays.MaxVA([np.ones(2)], b2_min=0.9, b2_max=0.5), ValueError, r"b2_min=0.9"),
    (lambda: arrays.Adam(np.ones(2)), TypeError, r"params is one array: pass a list"),
    (lambda: arrays.Adam([]), ValueError, r"params is empty"),
    (lambda: arrays.Adam(iter([np.ones(2)])), TypeError, r"params is a list_iterator"),
    (lambda: arrays.Adam([np.ones(2, dtype=int)]), TypeError, r"params\[0\] has dtype int"),
    (lambda: arrays.Adam([np.float64(1.0)]), TypeError, r"params\[0\] is a NumPy scalar"),
    (lambda: arrays.Adam([np.broadcast_to(np.ones(1), (3,))]), ValueError, r"read-only"),
    (lambda: arrays.Adam([GRADS[0], GRADS[0]]), ValueError, r"params\[1\] is the same array as"),
    (lambda: arrays.Adam([np.ones(2)], gan="yes"), TypeError, r"gan must be False, True or a dict"),
    (lambda: arrays.Adam([np.ones(2)], gan={"center": "rows"}), ValueError, r"center='rows'"),
    (lambda: arrays.Adam([np.ones(2)], gan={"centre": "tensor"}), TypeError, r"gan has no hyper"),
    (lambda: arrays.Adam([np.ones(2)], state_dtype="int32"), TypeError, r"state_dtype='int32' is not"),
], ids=["range", "unknown", "relation", "one-array", "empty", "iterator", "integer", "scalar",
        "read-only", "twice", "gan-type", "gan-option", "gan-unknown", "state-dtype"])
def test_bad_construction_is_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("library", ["jax", "torch"])
def test_arrays_of_other_libraries_are_refused(library):
    lib = pytest.importorskip(library)
    params = [lib.numpy.ones(3) if library == "jax" else lib.ones(3, dtype=lib.float64)]
    with pytest.raises(TypeError, match="this optimizer updates NumPy or CuPy arrays in place"):
        arrays.SGD(params)


# state_dict / load_state_dict


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_a_plain_dict_of_numpy_copies(name):
    opt, _ = _trained(name, gan=True)
    saved = opt.state_dict()
    assert saved["rule"] == name and saved["hyperparameters"] == opt.hyperparameters
    assert saved["gan"]["options"] == opt.gan
    assert list(saved["state"]) == list(opt.state._fields)
    assert int(saved["state"]["count"]) == 3 and int(saved["gan"]["state"]["count"]) == 3
    host = [a for k, v in saved["state"].items() for a in (v if k != "count" else (v,))]
    assert all(type(a) is np.ndarray for a in host)
    _assert_identical(host, _leaves(opt.state))
    _assert_same_tree(pickle.loads(pickle.dumps(saved)), saved)
    for a in host[1:]:
        a[...] = np.nan  # the dict holds copies: the optimizer does not see this
    assert not any(np.isnan(b).any() for b in _leaves(opt.state)[1:])


@pytest.mark.parametrize("via", ["dict", "pickle"])
@pytest.mark.parametrize("gan", [False, True], ids=["plain", "gan"])
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_mid_training_continues_bit_identically(name, gan, via):
    params, grad_steps = _problem("float32", steps=10)
    first = arrays.OPTIMIZERS[name](_copies(params), gan=gan, **HYPER[name])
    for grads in grad_steps[:5]:
        first.step(grads)
    first.hyperparameters["lr"] = 0.004  # as a schedule would: the load restores it
    saved = first.state_dict()
    if via == "pickle":
        saved = pickle.loads(pickle.dumps(saved))
    second = arrays.OPTIMIZERS[name](_copies(first.params), gan=gan)
    second.load_state_dict(saved)
    assert second.hyperparameters == first.hyperparameters and second.gan == first.gan
    for grads in grad_steps[5:]:
        first.step(grads)
        second.step(grads)
        _assert_identical(second.params, first.params)
    _assert_identical(_leaves(second.state), _leaves(first.state))


_CONTINUE = """
import pickle, sys
from mvn_core.adapters import arrays
with open(sys.argv[1], "rb") as f:
    runs = pickle.load(f)
out = {}
for name, (gan, saved, params, grad_steps) in runs.items():
    opt = arrays.OPTIMIZERS[name](params, gan=gan)
    opt.load_state_dict(saved)
    for grads in grad_steps:
        opt.step(grads)
    out[name] = (list(opt.params), opt.state_dict())
with open(sys.argv[2], "wb") as f:
    pickle.dump(out, f)
"""


def test_state_dict_continues_bit_identically_in_a_fresh_process(tmp_path):
    params, grad_steps = _problem("float32", steps=8)
    runs, here = {}, {}
    for i, name in enumerate(NAMES):
        gan = i % 2 == 1
        opt = arrays.OPTIMIZERS[name](_copies(params), gan=gan, **HYPER[name])
        for grads in grad_steps[:4]:
            opt.step(grads)
        runs[name] = (gan, opt.state_dict(), _copies(opt.params), grad_steps[4:])
        for grads in grad_steps[4:]:
            opt.step(grads)
        here[name] = (list(opt.params), opt.state_dict())
    (tmp_path / "in.pkl").write_bytes(pickle.dumps(runs))
    subprocess.run([sys.executable, "-c", _CONTINUE, "in.pkl", "out.pkl"], cwd=tmp_path,
                   check=True, capture_output=True, text=True)
    there = pickle.loads((tmp_path / "out.pkl").read_bytes())
    assert list(there) == NAMES
    for name in NAMES:
        _assert_identical(there[name][0], here[name][0])
        _assert_same_tree(there[name][1], here[name][1])


def _set(*path_and_value):
    """A function setting ``saved[k1][k2]...`` to a value, or to ``value(old)``."""
    *path, value = path_and_value

    def corrupt(saved):
        for key in path[:-1]:
            saved = saved[key]
        saved[path[-1]] = value(saved[path[-1]]) if callable(value) else value
    return corrupt


def _drop(key):
    def corrupt(saved):
        del saved[key]
    return corrupt


@pytest.mark.parametrize("corrupt, error, match", [
    (_set("rule", "adam"), ValueError, r"saved by a 'adam' optimizer; this one is 'mvn'"),
    (_set("state", "m", lambda m: m[:1]), ValueError, r"state.m holds 1 arrays but this one has 2"),
    (_set("state", "v", lambda v: (v[0], v[1][:2])), ValueError, r"state.v\[1\] has shape \(2,\)"),
    (_set("state", "u", lambda u: (u[0].astype(np.float32), u[1])), TypeError,
     r"state.u\[0\] has dtype float32 but this optimizer keeps float64"),
    (_set("state", "u", lambda u: (u[0].tolist(), u[1])), TypeError, r"u\[0\] is a list, not a"),
    (_set("state", "count", 3), TypeError, r"state.count is a int, not a NumPy array"),
    (_set("state", "count", lambda c: c.astype(np.int64)), TypeError, r"count has dtype int64"),
    (_set("state", "m", None), ValueError, r"state.m holds NoneType arrays"),
    (_set("state", "extra", ()), ValueError, r"mvn state has the keys"),
    (_drop("gan"), ValueError, r"state_dict has the keys"),
    (_set("gan", {"options": {}, "state": {}}), ValueError, r"with GAN on but this one has it off"),
    (_set("hyperparameters", "lr", -1.0), ValueError, r"lr=-1.0 is out of range"),
    (_set("hyperparameters", "momentum", 0.9), TypeError, r"mvn has no hyperparameter 'momentum'"),
    (_set("hyperparameters", [0.1]), TypeError, r"hyperparameters are a list, not a dict"),
    (_set("state", [1, 2]), TypeError, r"mvn state is a list, not a dict"),
], ids=["rule", "count-of-tensors", "shape", "dtype", "not-array", "count-int", "count-dtype",
        "column-none", "extra-field", "missing-key", "gan-mismatch", "bad-hyper", "unknown-hyper",
        "hyper-type", "state-type"])
def test_load_state_dict_refuses_a_mismatch_and_changes_nothing(corrupt, error, match):
    opt, _ = _trained("mvn", steps=2)
    saved_lr = 0.5
    saved = _trained("mvn", steps=4, lr=saved_lr)[0].state_dict()
    corrupt(saved)
    snapshot, hyper = _snapshot(opt), dict(opt.hyperparameters)
    with pytest.raises(error, match=match):
        opt.load_state_dict(saved)
    _assert_unchanged(opt, snapshot)
    assert opt.hyperparameters == hyper and hyper["lr"] != saved_lr


def test_load_state_dict_checks_gan_state():
    with_gan, _ = _trained("sgd", gan=True)
    without, _ = _trained("sgd")
    with pytest.raises(ValueError, match="saved with GAN off but this one has it on"):
        with_gan.load_state_dict(without.state_dict())
    saved = with_gan.state_dict()
    saved["gan"]["state"]["count"] = np.asarray(2, dtype=np.int64)
    snapshot = _snapshot(with_gan)
    with pytest.raises(TypeError, match="GAN state.count has dtype int64"):
        with_gan.load_state_dict(saved)
    _assert_unchanged(with_gan, snapshot)


def test_loaded_state_is_a_copy_of_the_dict():
    opt, grads = _trained("adam")
    saved = opt.state_dict()
    other, _ = _trained("adam", steps=1)
    other.load_state_dict(saved)
    saved["state"]["m"][0][...] = np.nan
    saved["hyperparameters"]["lr"] = 1.0
    _assert_identical(_leaves(other.state), _leaves(opt.state))
    assert other.hyperparameters["lr"] == HYPER["adam"]["lr"]


def test_state_dtype_must_match_to_load():
    opt, _ = _trained("laprop", state_dtype="float32")
    with pytest.raises(TypeError, match="has dtype float32 but this optimizer keeps float64"):
        arrays.LaProp([np.ones((3, 2)), np.ones(4)]).load_state_dict(opt.state_dict())
    same = arrays.LaProp([np.ones((3, 2)), np.ones(4)], state_dtype=np.float32)
    same.load_state_dict(opt.state_dict())
    _assert_identical(_leaves(same.state), _leaves(opt.state))


# CuPy (GPU): the same optimizer, arrays on the device


def _to_gpu(arrays_):
    import cupy

    return [cupy.asarray(a) for a in arrays_]


@needs_cupy
@pytest.mark.parametrize("name", NAMES)
def test_cupy_trajectory_equals_the_pure_rule_on_cupy_in_place(name):
    import cupy

    params, grad_steps = _problem("float32")
    gpu_steps = [_to_gpu(grads) for grads in grad_steps]
    held = _to_gpu(params)
    opt = arrays.OPTIMIZERS[name](held, gan=True, **HYPER[name])
    for grads in gpu_steps:
        opt.step(grads)
    want, state = _pure_run(name, _to_gpu(params), gpu_steps, [HYPER[name]] * STEPS, gan={})[-1]
    assert all(p is h and isinstance(p, cupy.ndarray) for p, h in zip(opt.params, held))
    assert all(isinstance(b, cupy.ndarray) for b in _leaves(opt.state))
    _assert_identical(opt.params, want)
    _assert_identical(_leaves(opt.state), _leaves(state))


@needs_cupy
@pytest.mark.parametrize("name", NAMES)
def test_cupy_state_loads_on_cpu_and_back(name):
    import cupy

    params, grad_steps = _problem("float32", steps=8)
    gpu = arrays.OPTIMIZERS[name](_to_gpu(params), **HYPER[name])
    for grads in grad_steps[:4]:
        gpu.step(_to_gpu(grads))
    saved = gpu.state_dict()
    host = [a for v in saved["state"].values() for a in (v if isinstance(v, tuple) else (v,))]
    assert all(type(a) is np.ndarray for a in host)
    cpu = arrays.OPTIMIZERS[name]([p.get() for p in gpu.params])
    cpu.load_state_dict(pickle.loads(pickle.dumps(saved)))
    _assert_same_tree(cpu.state_dict(), saved)
    again = arrays.OPTIMIZERS[name](_to_gpu(cpu.params))
    again.load_state_dict(cpu.state_dict())
    device = gpu.params[0].device
    assert all(isinstance(b, cupy.ndarray) and b.device == device for b in _leaves(again.state))
    for grads in grad_steps[4:]:
        gpu.step(_to_gpu(grads))
        again.step(_to_gpu(grads))
    _assert_identical(again.params, gpu.params)



@pytest.mark.parametrize("make", [
    lambda: np.lib.stride_tricks.as_strided(np.zeros(1), shape=(5,), strides=(0,), writeable=True),
    lambda: np.lib.stride_tricks.as_strided(np.zeros(4), shape=(3, 2), strides=(8, 8),
                                            writeable=True),
], ids=["stride_0", "rows_overlap"])
def test_a_param_whose_elements_share_memory_is_refused(make):
    param = make()
    with pytest.raises(ValueError, match=r"params\[1\] has elements that share memory"):
        arrays.SGD([np.zeros(2), param], lr=0.1)
    opt = arrays.SGD([np.zeros(2), np.zeros(param.shape)], lr=0.1)
    opt.params = (opt.params[0], param)  # swapped in later: refused at the step, before any write
    with pytest.raises(ValueError, match=r"params\[1\] has elements that share memory"):
        opt.step([np.ones(2), np.ones(param.shape)])
    assert np.array_equal(opt.params[0], np.zeros(2))
    arrays.SGD([np.zeros((6, 4))[::2, 1:3], np.zeros((3, 4)).T], lr=0.1)  # strided, disjoint


def test_views_of_one_buffer_are_refused():
    buffer = np.zeros(10)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        arrays.SGD([buffer[:6], buffer[4:]], lr=0.1)
    arrays.SGD([buffer[:5], buffer[5:]], lr=0.1)  # disjoint views of one buffer are fine
    with pytest.raises(AttributeError):
        arrays.SGD([np.ones(2)]).path = "pure"  # fixed when made


# The generated kernel (the default for NumPy arrays) and its fallback


@pytest.mark.parametrize("fused,path", [(None, "kernel"), (True, "kernel-only"), (False, "pure")])
def test_the_path_follows_fused(fused, path):
    assert arrays.Adam([np.ones(2)], fused=fused).path == path
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        arrays.Adam([np.ones(2)], fused=1)


@pytest.mark.parametrize("name", NAMES)
def test_arrays_the_kernel_cannot_take_run_the_pure_rule(name):
    """A strided view (here: every other element) makes the step run the pure rule:
    the same trajectory; with fused=True it is refused, and nothing changes."""
    params, grad_steps = _problem("float32")
    strided = [np.repeat(p.reshape(-1), 2).reshape(*p.shape, 2)[..., 0] if p.ndim else p.copy()
               for p in params]
    opt = arrays.OPTIMIZERS[name](strided, **HYPER[name])
    expected = _pure_run(name, params, grad_steps, [HYPER[name]] * STEPS)
    for grads, (want, _) in zip(grad_steps, expected):
        opt.step(grads)
    _assert_identical([np.array(p) for p in opt.params], want)
    strict = arrays.OPTIMIZERS[name](strided, fused=True, **HYPER[name])
    before = [p.copy() for p in strict.params]
    with pytest.raises(RuntimeError, match="fused=True cannot run here"):
        strict.step(grad_steps[0])
    _assert_identical([np.array(p) for p in strict.params], before)
    assert int(strict.state.count) == 0
