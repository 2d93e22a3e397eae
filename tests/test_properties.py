"""Property-based tests (hypothesis) over shapes, dtypes, hyperparameters and gradient scales.

What a rule must take, per dtype (the precondition of these properties):

* gradients and parameters of any finite value, including zeros and subnormals, up to
  ``sqrt(max) / (4 sqrt(n))`` where ``max`` is the largest value of the narrowest of the
  dtypes the step is computed and stored in, and ``n`` the tensor's size: there, ``g^2``,
  ``(g - m)^2 <= 4 g^2`` and NovoGrad's/GAN's sums over the tensor are finite.  That is
  4.6e18 / sqrt(n) for float32 (and bfloat16, computed in float32), 3.3e153 / sqrt(n) for
  float64, and 64 / sqrt(n) for float16 *state* (which holds ``v ~ g^2``: give float16
  parameters ``state_dtype="float32"`` to take their whole range).  Beyond it an
  Adam-type rule overflows in ``g * g`` as torch.optim and optax do;
* hyperparameters in their documented ranges, with every ``eps`` at least 1e-16 (the
  core refuses ``eps = 0``, with which a zero gradient would be ``0 / 0``).

The properties: finite inputs never give NaN or Inf (in float16/bfloat16 an update may be
genuinely larger than the dtype's range, e.g. Adam's ``m / eps`` right after the
gradient vanishes; it may then be +-Inf, never NaN); the exact power-of-two scale
equivariance of every rule whose mathematics has it; the first step's closed form; and
agreement of every backend with NumPy.

Examples are derandomized, so CI sees the same ones every run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mvn_core
from mvn_core import backends
from mvn_core.conformance import oracle
from mvn_core.conformance.tolerance import kappa, machine_eps

OPTIMIZERS = [name for name, rule in mvn_core.rules.items() if rule.kind == "optimizer"]
STEPS = 3
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
LARGEST = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38,
           "float64": 1.7976e308}
SMALLEST_SUBNORMAL = {"float16": 2.0 ** -24, "bfloat16": 2.0 ** -133, "float32": 2.0 ** -149,
                      "float64": 2.0 ** -1074}


def gradient_limit(dtype: str, n: int, state_dtype: str | None = None) -> float:
    """The largest ``|g|`` (and ``|theta|``) a rule must take: see the module docstring."""
    compute = "float64" if "float64" in (dtype, state_dtype) else "float32"
    tightest = min(LARGEST[d] for d in (dtype, state_dtype or dtype, compute))
    return math.sqrt(tightest) / (4 * math.sqrt(max(n, 1)))


# --- strategies -----------------------------------------------------------------------

shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)
betas = st.floats(0.0, 0.9999)  # hypothesis tries the ends, 0 and 0.9999, by itself
# eps-like constants from 1e-16 to 1e-3, log-uniform: a mantissa and a decimal exponent.
eps_values = st.builds(lambda k, m: m * 10.0 ** k, st.integers(-16, -4), st.floats(1.0, 9.99))
# Typical values, in range with every eps at least 1e-16.
TYPICAL = {"lr": st.integers(-7, 0).map(lambda k: 0.0 if k == -7 else 10.0 ** k),
           "beta": betas, "eps": eps_values, "eps_s": eps_values,
           "weight_decay": st.sampled_from([0.0, 1e-4, 0.1])}
# Everything the range check accepts within the magnitudes of the finite-output guarantee
# (lr, weight_decay, eps and eps_s at most 1): numbers are drawn wider than the check's
# range and filtered by the check itself, so that the property follows the check.
unit = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.999, 1 - 2.0 ** -24, 1 - 2.0 ** -53]),
                 st.floats(0.0, 1.0, exclude_max=True))
tiny_to_one = st.one_of(  # log-uniform, from below float32's smallest normal number to 1
    st.sampled_from([0.0, 2.0 ** -149, 2.0 ** -126, 2.0 ** -100, 2.0 ** -64, 1e-16, 1e-8, 1.0]),
    st.floats(-150.0, 0.0).map(lambda k: 2.0 ** k))
zero_to_one = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
WHOLE_RANGE = {"lr": zero_to_one, "beta": unit, "eps": tiny_to_one, "eps_s": tiny_to_one,
               "weight_decay": zero_to_one}


@st.composite
def hyperparameters(draw, rule: str, values: dict = TYPICAL) -> dict:
    """Values for every hyperparameter ``rule`` takes, by its declared range, from
    ``values`` (a strategy per name, ``"beta"`` for every one of range [0, 1), ``"eps"``
    for every eps); an option takes the values the rule's settings name; combinations
    the range check refuses are not drawn."""
    h = {}
    declared = mvn_core.rules[rule]
    for name, hyperparameter in declared.hyperparameters.items():
        kind = hyperparameter.range
        if kind == "flag":
            h[name] = draw(st.booleans())
        elif kind == "option":
            seen = {hyperparameter.default} | {s[name] for s in declared.settings if name in s}
            h[name] = draw(st.sampled_from(sorted(seen)))
        elif kind == "unit":
            h[name] = draw(values["beta"])
        else:
            h[name] = draw(values.get(name, values["eps" if kind == "eps" else "weight_decay"]))
    if "b2_min" in h:
        h["b2_min"], h["b2_max"] = sorted((h["b2_min"], h["b2_max"]))
    if h.get("nesterov") and h["momentum"] == 0.0:
        h["nesterov"] = False
    try:
        mvn_core.rules[rule].check_hyperparameters(**h)
    except ValueError:
        assume(False)
    return h


KINDS = ("scaled", "zeros", "subnormal", "mixed")


def _values(rng, kind, shape, exponent, dtype):
    """One gradient (or parameter) tensor of the given kind, in float64."""
    if kind == "zeros":
        return np.zeros(shape)
    if kind == "subnormal":
        return SMALLEST_SUBNORMAL[dtype] * rng.integers(-64, 65, size=shape)
    if kind == "scaled":
        return 10.0 ** exponent * rng.standard_normal(shape)
    magnitudes = 10.0 ** rng.uniform(-30, 30, size=shape)  # mixed: every scale at once
    magnitudes = np.where(rng.random(shape) < 0.2, 0.0, magnitudes)
    return np.where(rng.random(shape) < 0.1, SMALLEST_SUBNORMAL[dtype] * 3,
                    magnitudes * rng.choice([-1.0, 1.0], size=shape))


@st.composite
def tensors(draw, shape, dtype, state_dtype=None, steps=STEPS, kinds=KINDS):
    """``steps`` arrays of ``shape`` (float64 values), each of a drawn kind and scale,
    clipped to :func:`gradient_limit`."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    limit = gradient_limit(dtype, math.prod(shape), state_dtype)
    out = []
    for _ in range(steps):
        kind, exponent = draw(st.sampled_from(kinds)), draw(st.integers(-30, 30))
        out.append(np.clip(_values(rng, kind, shape, exponent, dtype), -limit, limit))
    return out


# --- helpers --------------------------------------------------------------------------

def _to(lib, arrays, dtype, device=None):
    return [lib.from_numpy(a, device=device, dtype=dtype) for a in arrays]


def _as_numpy(lib, arrays):
    return [np.asarray(lib.to_numpy(a), dtype=np.float64) for a in arrays]


def _run(rule_name, lib, params, grads_per_step, hyper, dtype, state_dtype=None, device=None):
    """Each step's updates and the final state (NumPy float64), params held fixed."""
    rule = mvn_core.rules[rule_name]
    params = _to(lib, params, dtype, device)
    state = rule.init(params, state_dtype=state_dtype)

    def step(state, grads, params):
        if rule.kind == "transform":
            return rule.update(state, grads, **hyper)
        return rule.update(state, grads, params, **hyper)

    updates = []
    for grads in grads_per_step:
        out, state = step(state, _to(lib, grads, dtype, device), params)
        updates.append(_as_numpy(lib, out))
    buffers = [b for field in state[1:] for b in (field if isinstance(field, tuple) else ())]
    return updates, _as_numpy(lib, buffers)


@st.composite
def problems(draw, rules, dtype, state_dtype=None, kinds=KINDS):
    """A rule, its hyperparameters, two tensors' shapes, params and per-step gradients."""
    rule = draw(st.sampled_from(rules))
    hyper = draw(hyperparameters(rule))
    tensor_shapes = [draw(shapes) for _ in range(2)]
    params = [draw(tensors(s, dtype, state_dtype, steps=1, kinds=kinds))[0] for s in tensor_shapes]
    per_tensor = [draw(tensors(s, dtype, state_dtype, kinds=kinds)) for s in tensor_shapes]
    grads = [list(step) for step in zip(*per_tensor)]
    return rule, hyper, params, grads


# --- finite in, finite out --------------------------------------------------------------

# The rules whose buffers fit a float16 state (their oracle entries say which do not:
# MVN-Grad's u holds g / sqrt(eps_s) as the noise vanishes).
HALF_STATE_RULES = [name for name in mvn_core.rules if oracle.ENTRIES[name].half_state]
# float16 params get float32 state by default; an explicit float16 state is checked too.
CASES = [("numpy", "float64", None), ("numpy", "float32", None),
         ("torch", "float16", None), ("torch", "bfloat16", None), ("torch", "float16", "float16")]


def _default_state_dtype(dtype: str) -> str:
    return "float32" if dtype in ("float16", "bfloat16") else dtype


@pytest.mark.parametrize("backend,dtype,state_dtype", CASES,
                         ids=[f"{b}-{d}-state_{s or _default_state_dtype(d)}" for b, d, s in CASES])
def test_finite_inputs_never_give_nan_or_inf(backend, dtype, state_dtype):
    reason = backends.get(backend).unavailable_reason()
    if reason:
        pytest.skip(reason)
    lib = backends.get(backend)
    state = state_dtype or _default_state_dtype(dtype)
    rules = HALF_STATE_RULES if state == "float16" else list(mvn_core.rules)

    @settings(max_examples=150, **SETTINGS)
    @given(problems(rules, dtype, state_dtype))
    def check(problem):
        rule, hyper, params, grads = problem
        updates, buffers = _run(rule, lib, params, grads, hyper, dtype, state_dtype)
        for b in buffers:
            assert np.all(np.isfinite(b)), f"{rule} state not finite: {b}"
        for step in updates:
            for u in step:
                assert not np.any(np.isnan(u)), f"{rule} update has NaN: {u}"
                if dtype in ("float32", "float64"):
                    assert np.all(np.isfinite(u)), f"{rule} update not finite: {u}"

    check()


# --- finite in, finite out, over the whole range the core accepts ---------------------------

# The count starts at 0 or just below 2**31 - 1, where it must saturate.
def _gradient_steps(rng, kind, shape, limit, steps):
    """``steps`` gradients of one tensor: the kinds of :func:`_values`, and the extremes
    that make a second moment vanish or overflow: ``limit`` itself then zeros (a spike),
    one gradient repeated (no variance), and a sign that flips."""
    if kind == "spike":
        first = limit * rng.choice([-1.0, 1.0], size=shape)
        return [first] + [np.zeros(shape)] * (steps - 1)
    if kind == "constant":
        return [np.full(shape, limit * rng.uniform(-1, 1))] * steps
    if kind == "flip":
        return [(-1.0) ** t * np.full(shape, limit) for t in range(steps)]
    return [np.clip(_values(rng, kind, shape, rng.integers(-30, 31), "float32"), -limit, limit)
            for _ in range(steps)]


WHOLE_RANGE_CASES = [("numpy", "float32"), ("numpy", "float64"), ("torch", "bfloat16"),
                     ("torch", "float16")]


@pytest.mark.parametrize("backend,dtype", WHOLE_RANGE_CASES,
                         ids=[f"{b}-{d}" for b, d in WHOLE_RANGE_CASES])
def test_finite_inputs_never_give_nan_or_inf_over_the_whole_range(backend, dtype):
    """Every rule of the registry.  Half-precision params keep float32 state (the
    default): the state stays finite, and an update may exceed float16's range (65504)
    only as +-Inf, never NaN."""
    reason = backends.get(backend).unavailable_reason()
    if reason:
        pytest.skip(reason)
    lib = backends.get(backend)
    xp = lib.namespace()

    @settings(max_examples=250 if backend == "numpy" else 80, **SETTINGS)
    @given(st.sampled_from(list(mvn_core.rules)), st.data())
    def check(rule_name, data):
        rule = mvn_core.rules[rule_name]
        hyper = data.draw(hyperparameters(rule_name, WHOLE_RANGE))
        rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
        tensor_shapes = [data.draw(shapes) for _ in range(2)]
        # |g| + weight_decay |theta| within the limit: each within half of it
        limits = [gradient_limit(dtype, math.prod(s), _default_state_dtype(dtype)) / 2
                  for s in tensor_shapes]
        kinds = st.sampled_from(KINDS + ("spike", "constant", "flip"))
        per_tensor = [_gradient_steps(rng, data.draw(kinds), s, limit, 4)
                      for s, limit in zip(tensor_shapes, limits)]
        params = _to(lib, [np.clip(limit * rng.uniform(-1, 1, s), -limit, limit)
                           for s, limit in zip(tensor_shapes, limits)], dtype)
        state = rule.init(params)
        count = data.draw(st.sampled_from([0, 2 ** 31 - 3]))
        state = state._replace(count=xp.asarray(count, dtype=xp.int32))
        for grads in zip(*per_tensor):
            grads = _to(lib, list(grads), dtype)
            if rule.kind == "transform":
                updates, state = rule.update(state, grads, **hyper)
            else:
                updates, state = rule.update(state, grads, params, **hyper)
            for b in _as_numpy(lib, [b for f in state[1:] if isinstance(f, tuple) for b in f]):
                assert np.all(np.isfinite(b)), (rule_name, hyper, b)
            for u in _as_numpy(lib, updates):
                assert not np.any(np.isnan(u)), (rule_name, hyper, u)
                if dtype != "float16":
                    assert np.all(np.isfinite(u)), (rule_name, hyper, u)
        assert 1 <= int(lib.to_numpy(state.count)) <= 2 ** 31 - 1

    check()


WITH_EPS = [name for name, rule in mvn_core.rules.items()
            if rule.hyperparameters.get("eps") and rule.hyperparameters["eps"].range == "eps"]


@pytest.mark.parametrize("rule", WITH_EPS)
def test_zero_eps_is_refused(rule):
    """Why the properties need ``eps > 0``: with ``eps = 0`` a zero gradient would make
    ``0 / 0`` (as ``torch.optim.Adam(eps=0)`` does); the core refuses it instead."""
    g = np.zeros(3)
    with pytest.raises(ValueError, match="eps=0.0 is out of range"):
        mvn_core.rules[rule].update(mvn_core.rules[rule].init(g), g, eps=0.0)


# --- scale equivariance ------------------------------------------------------------------

# Scaling g by c = 2^k scales each rule's state exactly (no rounding: a power of two)
# when eps scales as the quantity it is added to (power 1 beside sqrt(v), 2 inside v), as
# each rule's oracle entry says (Entry.scaling).  The others' mathematics is not
# equivariant: AdaBelief's one eps enters both s and the denominator, MaxVA has an
# absolute 1e-16 in beta, GAN a 1e-12 guard.
EQUIVARIANT = sorted(name for name in mvn_core.rules if oracle.ENTRIES[name].scaling)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_power_of_two_scale_equivariance(dtype):
    """``update(c g; c^p eps) == update(g; eps)`` bit for bit (SGD: ``c * update``), for
    gradients whose squares stay normal after scaling."""
    exponent = 60 if dtype == "float64" else 20

    @settings(max_examples=80, **SETTINGS)
    @given(st.sampled_from(EQUIVARIANT), st.integers(-exponent, exponent), st.data())
    def check(rule, k, data):
        hyper = dict(data.draw(hyperparameters(rule)), weight_decay=0.0)
        shape = data.draw(shapes)
        rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
        grads = [[(rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(-3, 3, shape))
                  .astype(dtype)] for _ in range(STEPS)]
        c = 2.0 ** k
        scaling = oracle.ENTRIES[rule].scaling
        scaled_hyper = dict(hyper, **{name: hyper[name] * c ** power
                                      for name, power in scaling.eps.items()})
        assume(scaled_hyper.get("eps", 1.0) >= 2.0 ** -64)  # the range check's floor
        lib = backends.get("numpy")
        base, _ = _run(rule, lib, [np.zeros(shape)], grads, hyper, dtype)
        scaled, _ = _run(rule, lib, [np.zeros(shape)], [[c * g[0]] for g in grads],
                         scaled_hyper, dtype)
        factor = c ** scaling.updates
        for u, v in zip(base, scaled):
            np.testing.assert_array_equal(v[0], factor * u[0])

    check()


# --- the first step in closed form --------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_first_step_closed_forms(dtype):
    """With random hyperparameters and gradients from 1e-15 to 1e15 (their squares normal)."""
    @settings(max_examples=100, **SETTINGS)
    @given(st.sampled_from(OPTIMIZERS), st.data())
    def check(rule, data):
        hyper = dict(data.draw(hyperparameters(rule)), weight_decay=0.0, lr=1.0)
        shape = data.draw(shapes)
        rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
        exponent = data.draw(st.integers(-15, 15))
        g = (10.0 ** exponent * rng.standard_normal(shape)).astype(dtype)
        (update,), _ = _run(rule, backends.get("numpy"), [np.zeros(shape)], [[g]], hyper, dtype)
        entry = oracle.ENTRIES[rule]
        expected = -entry.first_direction(g.astype(np.float64), hyper)
        lost = entry.first_direction_error(hyper)
        # b1 g formed as g - (1 - b1) g loses log2(1 / b1) bits: beyond 20 (b1 < 1e-6), it
        # is rounding noise, which no closed form describes.
        assume(lost < 2.0 ** 20)
        rtol = 64 * machine_eps(dtype) * (1 + math.log2(max(g.size, 1))) * lost
        np.testing.assert_allclose(update[0], expected, rtol=rtol, atol=0)

    check()


# --- every backend agrees with NumPy ---------------------------------------------------------

def _eager_targets():
    """Every eager target but NumPy itself (the compiled paths are checked against the
    oracle elsewhere: compiling afresh for every example would cost seconds each)."""
    from mvn_core.conformance.targets import targets

    for target, reason in targets():
        if target.compiled or target.backend == "numpy":
            continue
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        for dtype in ("float64", "float32"):
            if reason or dtype in target.dtypes():
                yield pytest.param(target, dtype, id=f"{target.id}-{dtype}", marks=marks)


@pytest.mark.parametrize("where,dtype", list(_eager_targets()))
def test_backends_agree_with_numpy(where, dtype):
    """The same random problem on another backend and on NumPy, step by step: each update
    within the rounding model (twice ``eps * kappa``, relative to the tensor's largest
    update).  Subnormal inputs are left to the finite-output test: XLA on CPU flushes
    subnormals to zero, so below the normal range the backends legitimately differ, and
    every difference smaller than the smallest normal number counts as agreement."""
    lib = backends.get(where.backend)
    numpy_lib = backends.get("numpy")
    floor = float(np.finfo(dtype).smallest_normal)

    @settings(max_examples=6 if where.backend == "jax" else 20, **SETTINGS)
    @given(problems(OPTIMIZERS, dtype, kinds=("scaled", "zeros", "mixed")))
    def check(problem):
        rule, hyper, params, grads = problem
        ours, _ = _run(rule, lib, params, grads, hyper, dtype, device=where.device)
        reference, _ = _run(rule, numpy_lib, params, grads, hyper, dtype)
        for t, (xs, refs) in enumerate(zip(ours, reference), start=1):
            for x, ref in zip(xs, refs):
                scale = float(np.max(np.abs(ref), initial=0.0))
                allowed = 2 * machine_eps(dtype) * kappa(rule, hyper, t, ref.size) * scale
                error = float(np.max(np.abs(x - ref), initial=0.0))
                assert error <= max(allowed, floor), (rule, t, hyper, error, allowed)

    check()
