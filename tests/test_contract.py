"""The core's contract (DESIGN.md): structure, purity, state, dtypes, devices, jit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import mvn_core
from mvn_core import backends

RULES = list(mvn_core.rules)


def _update(rule, state, grads, params):
    if rule.kind == "transform":
        return rule.update(state, grads)
    return rule.update(state, grads, params, weight_decay=0.01)


@pytest.mark.parametrize("name", RULES)
def test_structure_is_mirrored(name):
    rule = mvn_core.rules[name]
    p, g = np.ones((2, 3)), np.full((2, 3), 0.25)
    out, _ = _update(rule, rule.init(p), g, p)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3)
    for kind in (list, tuple):
        out, _ = _update(rule, rule.init(kind([p, p[0]])), kind([g, g[0]]), kind([p, p[0]]))
        assert type(out) is kind and [o.shape for o in out] == [(2, 3), (3,)]
    new = mvn_core.apply_updates((p,), (g,))
    assert type(new) is tuple


def test_named_tuples_are_mirrored():
    from typing import NamedTuple

    class Layer(NamedTuple):
        weight: object
        bias: object

    params = Layer(np.ones((2, 2)), np.zeros(2))
    updates, _ = mvn_core.mvn_update(mvn_core.mvn_init(params), Layer(*[p + 1 for p in params]))
    assert type(updates) is Layer
    assert type(mvn_core.apply_updates(params, updates)) is Layer


@pytest.mark.parametrize("name", RULES)
def test_nothing_is_mutated_and_read_only_inputs_work(name):
    rule = mvn_core.rules[name]
    params = [np.ones((3, 2)), np.linspace(-1, 1, 5)]
    grads = [np.full((3, 2), 0.5), np.arange(5.0)]
    _, state = _update(rule, rule.init(params), grads, params)
    frozen = [a for f in state for a in (f if isinstance(f, tuple) else (f,))]
    for a in params + grads + frozen:
        a.setflags(write=False)
    copies = [a.copy() for a in params + grads + frozen]
    out, new_state = _update(rule, state, grads, params)
    mvn_core.apply_updates(params, out)
    for a, c in zip(params + grads + frozen, copies):
        np.testing.assert_array_equal(a, c)
    assert int(new_state.count) == 2 and int(state.count) == 1


@pytest.mark.parametrize("name", RULES)
def test_state_is_a_named_tuple_of_count_and_tuples(target, name):
    rule = mvn_core.rules[name]
    lib = backends.get(target.backend)
    xp = lib.namespace()
    params = [lib.from_numpy(np.ones(s), device=target.device, dtype="float32")
              for s in [(3, 2), (4,), ()]]
    state = rule.init(params)
    assert type(state) is rule.state_type and state._fields[0] == "count"
    assert state.count.ndim == 0 and xp.isdtype(state.count.dtype, "integral")
    for field in state._fields[1:]:
        assert isinstance(getattr(state, field), tuple)
    grads = [xp.ones_like(p) for p in params]
    out, state = _update(rule, state, grads, params)
    assert int(lib.to_numpy(state.count)) == 1
    expected = target.device if target.device is not None else lib.default_device()
    for a in [state.count, *out, *[b for f in state[1:] for b in f]]:
        assert str(a.device) == str(expected)


@pytest.mark.parametrize("name", [n for n in RULES if n != "gan"])
def test_state_on_the_params_device(name):
    xp = pytest.importorskip("array_api_strict")
    rule = mvn_core.rules[name]
    device = xp.Device("device1")
    params = [xp.ones((3, 2), device=device), xp.zeros(4, device=device)]
    state = rule.init(params)
    for a in [state.count, *[b for f in state[1:] for b in f]]:
        assert a.device == device
    out, _ = rule.update(state, [xp.ones_like(p) for p in params])
    assert all(o.device == device for o in out)


@pytest.mark.parametrize("name", [n for n in RULES if n != "gan"])
@pytest.mark.parametrize("library", ["torch", "jax"])
def test_float32_state_for_bfloat16_params(name, library):
    lib = backends.get(library)
    if lib.unavailable_reason():
        pytest.skip(lib.unavailable_reason())
    rule = mvn_core.rules[name]
    xp = lib.namespace()
    rng = np.random.default_rng(2)
    values = [rng.standard_normal((4, 3)), rng.standard_normal(5)]
    params16 = [lib.from_numpy(v, dtype="bfloat16") for v in values]
    params32 = [lib.from_numpy(lib.to_numpy(p), dtype="float32") for p in params16]
    state16 = rule.init(params16, state_dtype="float32")
    state32 = rule.init(params32)
    for b in [b for f in state16[1:] for b in f]:
        assert b.dtype == xp.float32
    for _ in range(3):
        grads = [lib.from_numpy(rng.standard_normal(v.shape), dtype="bfloat16") for v in values]
        grads32 = [xp.astype(g, xp.float32) for g in grads]
        up16, state16 = rule.update(state16, grads, params16, lr=1e-2)
        up32, state32 = rule.update(state32, grads32, params32, lr=1e-2)
        assert all(u.dtype == xp.bfloat16 for u in up16)
        # float32 state and compute: the updates are the float32 ones, rounded to bfloat16
        for u16, u32 in zip(up16, up32):
            np.testing.assert_array_equal(lib.to_numpy(u16), lib.to_numpy(xp.astype(u32, xp.bfloat16)))
        params16 = mvn_core.apply_updates(params16, up16)
        params32 = [xp.astype(p, xp.float32) for p in params16]


@pytest.mark.parametrize("name", [n for n in RULES if n != "gan"])
def test_zero_gradients_give_no_nan(target, dtype, name):
    rule = mvn_core.rules[name]
    lib = backends.get(target.backend)
    params = [lib.from_numpy(np.ones(s), device=target.device, dtype=dtype) for s in [(3, 2), ()]]
    grads = [lib.namespace().zeros_like(p) for p in params]
    state = rule.init(params)
    for _ in range(5):
        updates, state = rule.update(state, grads, params)
        for u in updates:
            assert np.all(lib.to_numpy(u) == 0.0)
    for b in [b for f in state[1:] for b in f]:
        assert np.all(np.isfinite(lib.to_numpy(b)))


@pytest.mark.parametrize("name", [n for n in RULES if n != "gan"])
def test_array_hyperparameters_equal_number_hyperparameters(target, name):
    rule = mvn_core.rules[name]
    lib = backends.get(target.backend)
    dtype = "float64" if "float64" in target.dtypes() else "float32"
    floats = {k: v for k, v in rule.defaults.items() if isinstance(v, float)}
    floats.update(lr=0.05, weight_decay=0.1)
    arrays = {k: lib.from_numpy(np.asarray(v), device=target.device, dtype=dtype)
              for k, v in floats.items()}
    params = [lib.from_numpy(np.linspace(-1, 1, 6).reshape(2, 3), device=target.device, dtype=dtype)]
    grads = [lib.from_numpy(np.linspace(0.5, -2, 6).reshape(2, 3), device=target.device, dtype=dtype)]
    update = lib.compile(rule.update) if target.compiled else rule.update
    state_f, state_a = rule.init(params), rule.init(params)
    for _ in range(4):
        u_f, state_f = rule.update(state_f, grads, params, **floats)
        u_a, state_a = update(state_a, grads, params, **arrays)
        # the same values; array hyperparameters round (1 - b) in the dtype
        np.testing.assert_allclose(lib.to_numpy(u_a[0]), lib.to_numpy(u_f[0]),
                                   rtol=1e-12 if dtype == "float64" else 1e-5)


def test_changing_an_array_learning_rate_does_not_recompile():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    traces = []

    @jax.jit
    def step(state, grads, params, lr, b1):
        traces.append(1)
        updates, state = mvn_core.mvn_update(state, grads, params, lr=lr, b1=b1)
        return mvn_core.apply_updates(params, updates), state

    params = [jnp.ones((4, 3), dtype=jnp.float32), jnp.zeros(2, dtype=jnp.float32)]
    state = mvn_core.mvn_init(params)
    for i in range(5):
        lr = jnp.asarray(1e-3 * (i + 1), dtype=jnp.float32)
        b1 = jnp.asarray(0.9 - 0.01 * i, dtype=jnp.float32)
        params, state = step(state, [jnp.ones_like(p) for p in params], params, lr, b1)
    assert len(traces) == 1
    assert int(state.count) == 5


def test_state_is_a_pytree_and_can_be_donated():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    params = [jnp.ones((8,), dtype=jnp.float32), jnp.ones((2, 2), dtype=jnp.float32)]
    state = mvn_core.maxva_init(params)
    assert len(jax.tree.leaves(state)) == 1 + 4 * 2
    step = jax.jit(lambda s, g: mvn_core.maxva_update(s, g)[1], donate_argnums=0)
    new = step(state, [jnp.ones_like(p) for p in params])
    assert type(new) is mvn_core.MaxVAState and int(new.count) == 1
    assert state.m[0].is_deleted()  # donated: its buffer was reused


def test_torch_tensor_learning_rate():
    torch = pytest.importorskip("torch")
    params = [torch.ones(3, dtype=torch.float64)]
    grads = [torch.full((3,), 0.5, dtype=torch.float64)]
    u_tensor, _ = mvn_core.adam_update(mvn_core.adam_init(params), grads, lr=torch.tensor(0.1))
    u_float, _ = mvn_core.adam_update(mvn_core.adam_init(params), grads, lr=0.1)
    torch.testing.assert_close(u_tensor[0], u_float[0], rtol=1e-7, atol=0)


@pytest.mark.parametrize("name", [n for n in RULES if n != "gan"])
def test_updates_take_the_params_dtype_and_precision(name):
    """Mixed precision: bfloat16 gradients of float32 parameters are not rounded to
    bfloat16 on the way back."""
    torch = pytest.importorskip("torch")
    rule = mvn_core.rules[name]
    params = [torch.linspace(-1, 1, 12, dtype=torch.float32).reshape(3, 4)]
    grads16 = [torch.linspace(0.3, -2.0, 12, dtype=torch.bfloat16).reshape(3, 4)]
    grads32 = [g.float() for g in grads16]
    up16, _ = rule.update(rule.init(params), grads16, params, lr=0.1)
    up32, _ = rule.update(rule.init(params), grads32, params, lr=0.1)
    assert up16[0].dtype == torch.float32
    assert torch.equal(up16[0], up32[0])


def test_novograd_norm_of_a_large_float16_tensor_does_not_overflow():
    rng = np.random.default_rng(0)
    params = [np.zeros((1000, 1000), dtype=np.float16)]
    state = mvn_core.novograd_init(params)
    assert state.v[0].dtype == np.float32  # one number per tensor: kept in float32 at least
    for _ in range(3):
        g = (0.3 * rng.standard_normal((1000, 1000))).astype(np.float16)
        updates, state = mvn_core.novograd_update(state, [g], lr=1.0)
        assert np.isfinite(state.v[0]) and float(state.v[0]) > 65504  # beyond float16
        direction = -updates[0].astype(np.float64).ravel()
        assert np.corrcoef(direction, g.astype(np.float64).ravel())[0, 1] > 0.2


def test_novograd_norms_of_mixed_dtypes_are_each_tensors_own():
    """The norms of one call are reduced together, in the widest dtype, and read back
    in each tensor's own: the same numbers as tensor by tensor."""
    rng = np.random.default_rng(1)
    params = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(5)]
    grads = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(5)]
    updates, state = mvn_core.novograd_update(mvn_core.novograd_init(params), grads, params,
                                              weight_decay=0.1)
    for i in range(2):
        alone, alone_state = mvn_core.novograd_update(
            mvn_core.novograd_init(params[i]), grads[i], params[i], weight_decay=0.1)
        assert updates[i].dtype == params[i].dtype and state.v[i].dtype == alone_state.v[0].dtype
        np.testing.assert_array_equal(updates[i], alone)
        np.testing.assert_array_equal(state.v[i], alone_state.v[0])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_maxva_survives_an_overflowed_second_moment(dtype):
    huge = 3e19 if dtype == "float32" else 1e4  # its square overflows the dtype
    params = [np.zeros(3, dtype=dtype)]
    state = mvn_core.maxva_init(params)
    for g in (huge, 1.0, 1.0, -2.0):
        with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point
            updates, state = mvn_core.maxva_update(state, [np.full(3, g, dtype=dtype)])
        assert not np.isnan(updates[0]).any()
        for field in (state.u, state.w, state.m):
            assert not np.isnan(field[0]).any()


def test_maxva_with_full_weight_and_the_gradient_at_its_mean():
    """In float32 the weight w reaches exactly 1; a gradient equal to the running mean
    then made the old denominator cancel to 0 (a divide-by-zero warning fails here)."""
    params = [np.zeros(4, dtype=np.float32)]
    state = mvn_core.maxva_init(params)
    g = np.full(4, 0.5, dtype=np.float32)
    for _ in range(300):
        updates, state = mvn_core.maxva_update(state, [g], b2_min=0.5, b2_max=0.9)
    assert np.all(state.w[0] == 1.0)
    updates, state = mvn_core.maxva_update(state, [g], b2_min=0.5, b2_max=0.9)
    assert np.all(np.isfinite(updates[0])) and np.all(np.isfinite(state.v[0]))


def test_rectified_adabelief_at_a_late_count_with_b2_near_one():
    """The rectification ratio of three numbers up to 2/(1 - b2) ~ 2**51 overflowed
    float32 as a product (Inf / Inf), which zeroed the step; as a product of three
    bounded ratios it is the float64 step, to float32's resolution of rho_t there."""
    steps = {}
    for dtype in (np.float32, np.float64):
        state = mvn_core.adabelief_init([np.zeros(3, dtype=dtype)])
        state = state._replace(count=np.asarray(2 ** 30, dtype=np.int32))
        for _ in range(3):
            updates, state = mvn_core.adabelief_update(
                state, [np.full(3, 0.5, dtype=dtype)], rectify=True, b2=1 - 2.0 ** -50)
        steps[dtype] = updates[0].astype(np.float64)
    assert np.all(steps[np.float64] < 0)
    np.testing.assert_allclose(steps[np.float32], steps[np.float64], rtol=0.25)


def test_jax_without_x64_agrees_with_numpy_float32():
    """The suite enables x64; a user's default JAX (float32 only) is checked apart."""
    pytest.importorskip("jax")
    import subprocess
    import sys

    script = """
import numpy as np, jax, jax.numpy as jnp, mvn_core
assert not jax.config.jax_enable_x64
from mvn_core.conformance.problems import make_problem
from mvn_core.conformance.trajectories import core_trajectory
problem = make_problem(30, seed=4)
for rule in mvn_core.rules:
    hyper = {} if rule == "gan" else {"lr": 0.01, "weight_decay": 0.1}
    a = core_trajectory(rule, "jax", problem, dtype="float32", compiled=True, **hyper)
    b = core_trajectory(rule, "numpy", problem, dtype="float32", **hyper)
    for x, y in zip(a[-1], b[-1]):
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5 * max(1.0, np.max(np.abs(y), initial=0)))
print("agree")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "agree"


SHARDED = """
import jax, jax.numpy as jnp, numpy as np, mvn_core
from jax.sharding import Mesh, NamedSharding, PartitionSpec
mesh = Mesh(np.array(jax.devices()), ("x",))
params = [jax.device_put(jnp.arange(8.0).reshape(4, 2), NamedSharding(mesh, PartitionSpec("x"))),
          jax.device_put(jnp.ones(3), NamedSharding(mesh, PartitionSpec()))]
state = mvn_core.novograd_init(params)
updates, state = mvn_core.novograd_update(state, [p + 1 for p in params], params, weight_decay=0.1)
print([u.sharding.is_equivalent_to(p.sharding, p.ndim) for u, p in zip(updates, params)])
print([m.sharding.is_equivalent_to(p.sharding, p.ndim) for m, p in zip(state.m, params)])
"""


def test_jax_params_sharded_differently_over_the_same_devices():
    """A weight split over two devices beside a replicated bias is legal (a sharded array
    reports its sharding as its device; it has no single device to compare)."""
    pytest.importorskip("jax")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[True,", "True]"] * 2


# --- half-precision parameters ------------------------------------------------------------

HALF = [("numpy", "float16"), ("torch", "float16"), ("torch", "bfloat16"), ("jax", "float16"),
        ("jax", "bfloat16")]


@pytest.mark.parametrize("library,dtype", HALF, ids=[f"{lib}-{d}" for lib, d in HALF])
def test_half_precision_params_get_float32_state_unless_told_otherwise(library, dtype):
    lib = backends.get(library)
    if lib.unavailable_reason():
        pytest.skip(lib.unavailable_reason())
    xp = lib.namespace()
    params = [lib.from_numpy(np.ones(s), dtype=dtype) for s in [(3, 2), ()]]
    for name in [n for n in RULES if n != "gan"]:
        rule = mvn_core.rules[name]
        for b in [b for f in rule.init(params)[1:] for b in f]:
            assert b.dtype == xp.float32
        explicit = [b for f in rule.init(params, state_dtype=dtype)[1:] for b in f]
        assert any(b.dtype == getattr(xp, dtype) for b in explicit)  # the explicit dtype wins
    wide = [lib.from_numpy(np.ones(3), dtype="float64")]
    assert mvn_core.adam_init(wide).m[0].dtype == xp.float64


@pytest.mark.parametrize("name", [n for n in RULES if n != "gan"])
def test_float16_params_with_small_gradients_step_as_in_float64(name):
    """At g ~ 1e-4 a float16 second moment (~1e-8, below float16's normal range) was
    rounded to a few bits or to zero: the updates came out up to hundreds of times the
    float64 ones.  With the default float32 state they are the float64 ones, rounded to
    float16."""
    rule = mvn_core.rules[name]
    rng = np.random.default_rng(7)
    values = rng.standard_normal((8, 8))
    half, wide = [values.astype(np.float16)], [values.astype(np.float16).astype(np.float64)]
    state_half, state_wide = rule.init(half), rule.init(wide)
    lr = 10.0 if name == "sgd" else 1e-3  # updates within float16's normal range
    for _ in range(20):
        g = (1e-4 * rng.standard_normal((8, 8))).astype(np.float16)
        up_half, state_half = rule.update(state_half, [g], half, lr=lr)
        up_wide, state_wide = rule.update(state_wide, [g.astype(np.float64)], wide, lr=lr)
    reference = up_wide[0]
    error = np.max(np.abs(up_half[0].astype(np.float64) - reference))
    assert error <= 2e-3 * np.max(np.abs(reference))  # float16 rounding of the update (2**-11)


# --- autograd ----------------------------------------------------------------------------

def _guide_snippet(containing):
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "pure-api.md").read_text()
    blocks = guide.split("```python\n")[1:]
    found = [b.split("```")[0] for b in blocks if containing in b.split("```")[0]]
    assert len(found) == 1, f"the pure API's guide has {len(found)} python blocks with {containing!r}"
    return found[0]


def test_the_documented_idiom_for_parameters_that_require_grad():
    """The pure functions are differentiable (nothing stops autograd), so with params
    that require grad and coupled weight decay the state carries every step's graph;
    the contract (docs/guide/pure-api.md) shows the ``torch.no_grad()`` idiom, which keeps
    it plain."""
    torch = pytest.importorskip("torch")
    namespace = {}
    exec(_guide_snippet("torch.no_grad()"), namespace)
    state = namespace["state"]
    assert int(state.count) == 3
    assert all(not a.requires_grad and a.grad_fn is None
               for field in state[1:] for a in field)
    params, grads = namespace["params"], [torch.ones_like(p) for p in namespace["params"]]
    _, traced = mvn_core.mvn_update(state, grads, params, weight_decay=0.01,
                                    coupled_weight_decay=True)  # without the idiom
    assert traced.m[0].grad_fn is not None
