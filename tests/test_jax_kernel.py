"""The generated kernel under JAX (``adapters/_jax_kernel.py``): the default step of the
optax transformations on the CPU, an XLA custom call that updates the state in place.

Its steps must be the rule's mathematics in IEEE arithmetic, bit for bit, from the
step's scalars as JAX computes them (``ieee_trajectory``, with ``compiled`` for jitted
steps), for every rule with per-tensor mathematics, every setting of the check, every
dtype, jitted and eager, with the state packed or per tensor.  A jitted step with
donated state is one custom call writing the state where it lies (no copies); new
hyperparameter values compile nothing; without a compiler, under ``jax.vmap`` and in
derivatives the pure rule runs.  The kernel mode that writes the updates (rather than
the parameters) is checked on NumPy first, without JAX.
"""

from __future__ import annotations

import re
import warnings

import array_api_compat.numpy as npx
import numpy as np
import pytest

import mvn_core
from mvn_core.adapters import _cpu_kernel, _elementwise, _native
from mvn_core.conformance.cases import cases

KERNEL_RULES = [n for n, r in mvn_core.rules.items() if r.tensor_rule is not None]
CASES = list(cases(KERNEL_RULES))
HAS_COMPILER = _cpu_kernel.unavailable_reason() is None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")
SHAPES = [(), (0,), (7,), (5, 4), (_cpu_kernel.CHUNK + 3,), (0, 3), (2, 3, 2, 3)]
OPTAX_NAMES = {"mvn": "mvn_grad"}


# ---- the kernel that writes the updates, on NumPy -------------------------------------

def _numpy_problem(dtype, steps=3, seed=1, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    grads = [[np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1, s), dtype=dtype)
              for s in shapes] for _ in range(steps)]
    return params, grads


def _update_kernel_step(rule, state, params, grads, hyper):
    """One step of the kernel that writes the updates: the updates and the new state
    (its buffers written in place); the params are only read."""
    tensor_rule = rule.tensor_rule
    decays = tensor_rule.decays(hyper)
    count = npx.asarray(state.count + 1)
    dtype = tensor_rule.compute_dtype(npx, grads[0].dtype, state[1][0].dtype, params[0].dtype)
    c = tensor_rule.scalars(npx, count, dtype, hyper)
    element, per_tensor = _cpu_kernel.split_buffers(tensor_rule, list(state[1:]))
    names = [params[0].dtype, grads[0].dtype, (element or per_tensor)[0][0].dtype]
    names += [per_tensor[0][0].dtype] if per_tensor else []
    kernel = _cpu_kernel.source(tensor_rule, _elementwise.describe(c),
                                tuple(str(n) for n in names), decays, in_place=False)
    assert "update" in kernel.roles and "P_p[i] =" not in kernel.source
    fn = _native.function(kernel.source, kernel.name)
    updates = [np.empty_like(p) for p in params]
    arrays = {"p": params, "g": grads, "update": updates}
    arrays.update({f"b_{n}": column for n, column in
                   zip([n for n in tensor_rule.buffer_names if n not in tensor_rule.scalar_buffers]
                       + [n for n in tensor_rule.buffer_names if n in tensor_rule.scalar_buffers],
                       element + per_tensor)})
    table = np.array([a.ctypes.data for role in kernel.roles for a in arrays[role]], np.uint64)
    scalars = np.array([float(getattr(c, name)) for name in kernel.scalars] or [0.0])
    stats = None
    if kernel.has_statistic:
        stats = np.array([float(s) for s in tensor_rule.statistics(
            npx, [(g, dtype) for g in grads])], np.float64)
    numel = np.array([p.size for p in params], np.int64)
    fn(len(params), numel.ctypes.data, table.ctypes.data, scalars.ctypes.data,
       None if stats is None else stats.ctypes.data, _cpu_kernel.CHUNK, 2)
    return updates, state._replace(count=count)


@needs_compiler
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_kernel_writing_the_updates_is_the_pure_rule_on_numpy(case):
    """Updates, bit for bit those of the pure rule on NumPy (IEEE arithmetic), over
    several chunks and empty and 0-d tensors; the parameters are left as they were."""
    rule = mvn_core.rules[case.rule]
    hyper = rule.tensor_rule.checked_hyperparameters({**rule.defaults, **case.hyper})
    params, grad_steps = _numpy_problem("float32")
    state, pure_state = rule.init(params), rule.init(params)
    for grads in grad_steps:
        before = [p.copy() for p in params]
        updates, state = _update_kernel_step(rule, state, params, grads, hyper)
        expected, pure_state = rule.update(pure_state, grads, params, **hyper)
        for u, e in zip(updates, expected):
            np.testing.assert_array_equal(u, e)
        for p, b in zip(params, before):
            np.testing.assert_array_equal(p, b)
        for column, pure_column in zip(state[1:], pure_state[1:]):
            for b, e in zip(column, pure_column):
                np.testing.assert_array_equal(b, e)
        params = mvn_core.apply_updates(params, updates)


# ---- the kernel under JAX -------------------------------------------------------------

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

from mvn_core.adapters import _jax_kernel  # noqa: E402
from mvn_core.adapters import optax as adapter  # noqa: E402
from mvn_core.adapters._jax_kernel import Packed  # noqa: E402
from mvn_core.conformance.problems import make_problem  # noqa: E402
from mvn_core.conformance.trajectories import ieee_trajectory  # noqa: E402

JAX_SHAPES = ((5, 4), (4,), (), (2, 3, 2, 3), (0, 3))
# name: (params' dtype, state_dtype)
DTYPES = {"float32": ("float32", None), "float64": ("float64", None),
          "bfloat16": ("bfloat16", "float32"), "float16": ("float16", "float32")}


def _transformation(rule_name, hyper, **options):
    hyper = dict(hyper)
    rate = hyper.pop("lr", mvn_core.rules[rule_name].defaults["lr"])
    return getattr(adapter, OPTAX_NAMES.get(rule_name, rule_name))(rate, **hyper, **options)


def _tree(arrays, dtype):
    """The arrays as a pytree (in the order of its leaves), with a None leaf."""
    a, b, c, d, e = (jnp.asarray(x, dtype=dtype) for x in arrays)
    return [a, (b, None), {"c": c, "d": d}, e]


def _run(transformation, problem, dtype, jit):
    params = _tree(problem.params, dtype)
    state = transformation.init(params)

    def step(params, state, grads):
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    if jit:
        step = jax.jit(step, donate_argnums=(0, 1))
    out = []
    for grads in problem.grads:
        params, state = step(params, state, _tree(grads, dtype))
        out.append([np.asarray(p.astype(jnp.float64)) for p in jax.tree.leaves(params)])
    return out, state


def _assert_trajectories_equal(got, expected):
    for step, (a_step, b_step) in enumerate(zip(got, expected, strict=True), start=1):
        for i, (a, b) in enumerate(zip(a_step, b_step, strict=True)):
            np.testing.assert_array_equal(a, np.asarray(b, np.float64),
                                          err_msg=f"step {step}, tensor {i}")


@needs_compiler
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_rule_is_the_rule_in_ieee_arithmetic(case, dtype):
    """Jitted with the state packed (the default here), and eager with the state per
    tensor."""
    param_dtype, state_dtype = DTYPES[dtype]
    problem = make_problem(3, seed=7, shapes=JAX_SHAPES)
    for jit, layout in ((True, "packed"), (False, "tree")):
        transformation = _transformation(case.rule, case.hyper, state_dtype=state_dtype,
                                         state_layout=layout)
        got, state = _run(transformation, problem, param_dtype, jit)
        assert all(isinstance(f, Packed) == (layout == "packed") for f in state[1:])
        expected = ieee_trajectory(case.rule, "jax", problem, dtype=param_dtype,
                                   compiled=jit, state_dtype=state_dtype, **case.hyper)
        _assert_trajectories_equal(got, expected)


def _kernel_calls(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines()
            if "custom-call(" in line and 'custom_call_target="mvn_core_' in line]


def _copies_of_arrays(hlo: str) -> list[str]:
    """The copy instructions of arrays of more than one element (not the count's)."""
    copies = []
    for line in hlo.splitlines():
        found = re.search(r"= \w+\[([\d,]*)\]\S* copy\(", line)
        if found and np.prod([int(d) for d in found.group(1).split(",") if d]) > 1:
            copies.append(line)
    return copies


@needs_compiler
@pytest.mark.parametrize("layout", ["packed", "tree"])
def test_a_jitted_step_is_one_custom_call_writing_the_donated_state_in_place(layout):
    params = _tree(make_problem(1, shapes=JAX_SHAPES).params, jnp.float32)
    grads = jax.tree.map(lambda p: 0.5 * p + 1.0, params)
    transformation = adapter.mvn_grad(1e-2, weight_decay=0.1, state_layout=layout)
    state = transformation.init(params)

    def step(params, state, grads):
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    donating = jax.jit(step, donate_argnums=(0, 1))
    hlo = donating.lower(params, state, grads).compile().as_text()
    (call,) = _kernel_calls(hlo)
    assert "output_to_operand_aliasing" in call
    assert _copies_of_arrays(hlo) == []
    buffers = [b for b in jax.tree.leaves(state[1:]) if b.size]
    addresses = [b.unsafe_buffer_pointer() for b in buffers]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Some donated buffers were not usable" fails
        params, state = donating(params, state, grads)
    assert all(b.is_deleted() for b in buffers)
    assert [b.unsafe_buffer_pointer() for b in jax.tree.leaves(state[1:]) if b.size] == addresses
    # not donated, the state is kept: XLA copies it, the kernel writes the copy
    plain = jax.jit(step).lower(params, state, grads).compile().as_text()
    assert len(_kernel_calls(plain)) == 1 and _copies_of_arrays(plain)


@needs_compiler
@pytest.mark.parametrize("layout", ["packed", "tree"])
def test_launches_are_cut_to_keep_the_temporaries_small(monkeypatch, layout):
    """A launch writes at most ``LAUNCH_BYTES`` of updates (a larger tensor alone); the
    parts of a packed array are chained through it in place, with no copies."""
    monkeypatch.setattr(_jax_kernel, "LAUNCH_BYTES", 64)  # 16 float32 values
    problem = make_problem(3, seed=2, shapes=JAX_SHAPES)  # 20, 4 + 1, 36 and 0 values
    transformation = _transformation("novograd", {"weight_decay": 0.1}, state_layout=layout)
    got, state = _run(transformation, problem, "float32", jit=True)
    _assert_trajectories_equal(got, ieee_trajectory("novograd", "jax", problem, dtype="float32",
                                                    compiled=True, weight_decay=0.1))
    params = _tree(problem.params, jnp.float32)

    def step(params, state, grads):
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
    assert len(_kernel_calls(hlo)) == 4 and _copies_of_arrays(hlo) == []


@needs_compiler
def test_schedules_and_injected_hyperparameters_compile_nothing_new(monkeypatch):
    """A schedule's rate and injected hyperparameters are operands of the call: new
    values neither retrace nor recompile the step, nor build another kernel."""
    params = _tree(make_problem(1, shapes=JAX_SHAPES).params, jnp.float32)
    grads = jax.tree.map(lambda p: 0.5 * p + 1.0, params)
    schedule = optax.cosine_decay_schedule(0.1, 10)
    for transformation in (adapter.laprop(schedule, weight_decay=0.1),
                           optax.inject_hyperparams(adapter.laprop)(learning_rate=0.1, b1=0.8)):
        state = transformation.init(params)
        step = jax.jit(transformation.update)
        updates, state = step(grads, state, params)  # compiles the kernel, if need be
        assert len(_kernel_calls(step.lower(grads, state, params).as_text("hlo"))) == 1

        def no_compiler(*args, **kwargs):
            raise AssertionError("no new kernel may be compiled")

        with monkeypatch.context() as patch:
            patch.setattr(_native.subprocess, "run", no_compiler)
            seen = [jax.tree.leaves(updates)[0]]
            for t in range(3):
                if hasattr(state, "hyperparams"):
                    state.hyperparams["learning_rate"] = jnp.asarray(0.1 / (t + 2), jnp.float32)
                    state.hyperparams["b1"] = jnp.asarray(0.8 + 0.05 * t, jnp.float32)
                updates, state = step(grads, state, params)
                seen.append(jax.tree.leaves(updates)[0])
        assert step._cache_size() == 1
        assert all(not np.array_equal(a, b) for a, b in zip(seen, seen[1:]))


@needs_compiler
def test_params_and_gradients_of_several_dtypes():
    """A packed array per dtype of the params; gradients of another dtype than their
    params split a launch.  Packed and per-tensor states step alike."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
              "h": jnp.asarray(rng.standard_normal(7), jnp.bfloat16),
              "b": jnp.asarray(rng.standard_normal(5), jnp.float32),
              "s": jnp.asarray(rng.standard_normal(()), jnp.bfloat16)}
    grads = {"w": params["w"] * 0.5, "h": params["h"].astype(jnp.float32) * 0.25,
             "b": params["b"] + 1.0, "s": params["s"] * 2}
    results = []
    for name in ("mvn_grad", "novograd"):
        for layout in ("packed", "tree"):
            transformation = getattr(adapter, name)(0.01, weight_decay=0.1, state_layout=layout,
                                                    state_dtype="float32")
            state = transformation.init(params)
            step = jax.jit(transformation.update)
            for _ in range(3):
                updates, state = step(grads, state, params)
            hlo = step.lower(grads, state, params).as_text("hlo")
            assert len(_kernel_calls(hlo)) == 3  # f32 (f32 grads), bf16 (f32 grads), bf16
            results.append((updates, state))
        (packed_updates, packed_state), (tree_updates, tree_state) = results[-2:]
        assert len(packed_state.m.arrays) == 2
        for a, b in zip(jax.tree.leaves(packed_updates), jax.tree.leaves(tree_updates)):
            np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
        for field in packed_state._fields[1:]:
            for a, b in zip(jax.tree.leaves(getattr(packed_state, field).tree()),
                            jax.tree.leaves(getattr(tree_state, field))):
                np.testing.assert_array_equal(a, b)


@needs_compiler
def test_a_packed_state_refuses_what_the_rule_refuses():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    transformation = adapter.adam(0.1)
    state = transformation.init(params)
    assert isinstance(state.m, Packed)
    with pytest.raises(ValueError, match=r"state.m\[0\] has shape \(2,\)"):
        transformation.update({"w": jnp.ones((3, 2)), "b": jnp.ones(3)}, state)
    with pytest.raises(ValueError, match="state.m is not a tree shaped like the updates"):
        transformation.update({"w": jnp.ones((3, 2))}, state)
    with pytest.raises(TypeError, match="grads"):
        transformation.update({"w": jnp.ones((3, 2), jnp.int32), "b": jnp.ones(2)}, state)
    with pytest.raises(ValueError, match="weight decay needs the parameters"):
        adapter.adam(0.1, weight_decay=0.1).update(params, state)


def test_without_a_compiler_the_pure_rule_runs_after_one_warning(monkeypatch):
    """Per-tensor state (the layout init then chooses) is stepped by the pure rule;
    a packed state, made where a compiler was, by the rule's pure mathematics too."""
    def none(*args, **kwargs):
        raise _native.KernelUnavailable("no working C compiler was found")

    monkeypatch.setattr(_native, "compiler", none)
    _cpu_kernel._warn_once.cache_clear()
    _jax_kernel._target.cache_clear()  # forget the kernels compiled so far
    rule = mvn_core.rules["adam"]
    params = _tree(make_problem(1, shapes=JAX_SHAPES).params, jnp.float32)
    grads = jax.tree.map(lambda p: 0.5 * p + 1.0, params)
    pure = jax.jit(lambda g, s, p: rule.update(s, jax.tree.leaves(g), jax.tree.leaves(p),
                                               lr=0.1, weight_decay=0.1))
    expected, _ = pure(grads, rule.init(jax.tree.leaves(params)), params)
    with pytest.warns(RuntimeWarning, match="no working C compiler"):
        state = adapter.adam(0.1, weight_decay=0.1).init(params)
    assert not isinstance(state.m, Packed)
    for layout in ("tree", "packed"):
        transformation = adapter.adam(0.1, weight_decay=0.1, state_layout=layout)
        state = transformation.init(params)
        step = jax.jit(transformation.update)
        updates, _ = step(grads, state, params)
        assert _kernel_calls(step.lower(grads, state, params).as_text("hlo")) == []
        for a, b in zip(jax.tree.leaves(updates), expected):
            np.testing.assert_array_equal(a, b)


@needs_compiler
def test_under_vmap_and_in_derivatives_the_pure_rule_runs():
    """The custom call has no batching or differentiation rule of its own: the
    primitive is then the rule's pure mathematics, as the pure rule computes it."""
    rule = mvn_core.rules["novograd"]
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    batch = {"w": jnp.linspace(0.5, 2.0, 24).reshape(2, 3, 4), "b": jnp.full((2, 4), 0.25)}
    transformation = adapter.novograd(0.1, weight_decay=0.1)
    state = transformation.init(params)
    flat = jax.tree.leaves(params)

    def ours(g):
        return jax.tree.leaves(transformation.update(g, state, params)[0])

    def pure(g):
        return rule.update(rule.init(flat), jax.tree.leaves(g), flat, lr=0.1,
                           weight_decay=0.1)[0]

    for a, b in zip(jax.vmap(ours)(batch), jax.vmap(pure)(batch)):
        np.testing.assert_array_equal(a, b)
    one = jax.tree.map(lambda g: g[0], batch)
    grad_ours = jax.grad(lambda g: sum(jnp.sum(u * u) for u in ours(g)))(one)
    grad_pure = jax.grad(lambda g: sum(jnp.sum(u * u) for u in pure(g)))(one)
    for a, b in zip(jax.tree.leaves(grad_ours), jax.tree.leaves(grad_pure)):
        np.testing.assert_array_equal(a, b)


def test_on_a_gpu_the_pure_rule_runs():
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX finds no GPU")
    rule = mvn_core.rules["mvn"]
    params = jax.device_put({"w": jnp.ones((3, 4)), "b": jnp.ones(4)}, gpu)
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    transformation = adapter.mvn_grad(0.1)
    state = transformation.init(params)
    assert not isinstance(state.m, Packed)
    step = jax.jit(transformation.update)
    updates, _ = step(grads, state, params)
    assert _kernel_calls(step.lower(grads, state, params).as_text("hlo")) == []
    expected, _ = jax.jit(lambda g, s: rule.update(s, g, lr=0.1))(
        jax.tree.leaves(grads), rule.init(jax.tree.leaves(params)))
    for a, b in zip(jax.tree.leaves(updates), expected):
        np.testing.assert_array_equal(a, b)
