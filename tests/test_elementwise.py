"""The kernel generator: a rule's pure mathematics traced (``_elementwise``) and printed
as one multi-tensor C function (``_c_source``), compiled and cached (``_native``).

The CPU kernel must reproduce the pure rule on NumPy bit for bit, for every rule with
per-tensor mathematics and every setting of the check; its compilation must be cached
on disk; and its square roots must be inlined (vectorizable).  The GPU's printers are
tested in ``test_triton_kernel.py`` and ``test_cuda_kernel.py``.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import array_api_compat.numpy as npx
import numpy as np
import pytest

import mvn_core
from mvn_core.adapters import _c_source, _cpu_kernel, _elementwise, _native, arrays
from mvn_core.conformance.cases import cases

KERNEL_RULES = [n for n, r in mvn_core.rules.items() if r.tensor_rule is not None]
CASES = [case for case in cases(KERNEL_RULES)]
SHAPES = [(), (0,), (7,), (5, 4), (_cpu_kernel.CHUNK + 3,), (0, 3), (2, 3, 2, 3)]
HAS_COMPILER = _cpu_kernel.unavailable_reason() is None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler")


def _kernel_steps(rule, params, grad_steps, hyper, state_dtype=None, negate=False):
    """The CPU kernel run over NumPy arrays, in place: the params after each step, and
    the final state's buffers."""
    tensor_rule = rule.tensor_rule
    hyper = tensor_rule.checked_hyperparameters({**rule.defaults, **hyper})
    decays = tensor_rule.decays(hyper)
    state = rule.init(params, state_dtype=state_dtype)
    params = [p.copy() for p in params]
    columns, count = list(state[1:]), state.count
    out = []
    for grads in grad_steps:
        count = npx.asarray(count + 1)
        launches, rest = _cpu_kernel.plan(npx, tensor_rule, params, grads, columns, count,
                                          hyper, decays, lambda i: True, negate)
        assert not rest
        _cpu_kernel.run(npx, tensor_rule, launches, params, grads, columns, decays,
                        lambda a: a.ctypes.data, lambda a: a.size, negate_grad=negate)
        out.append([p.copy() for p in params])
    return out, columns


def _pure_steps(rule, params, grad_steps, hyper, state_dtype=None):
    state = rule.init(params, state_dtype=state_dtype)
    out = []
    for grads in grad_steps:
        updates, state = rule.update(state, grads, params, **hyper)
        params = mvn_core.apply_updates(params, updates)
        out.append(params)
    return out, list(state[1:])


def _problem(dtype, steps=4, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]
    grads = [[np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1, s), dtype=dtype)
              for s in shapes] for _ in range(steps)]
    for step in grads:
        for g in step:
            g.reshape(-1)[:16] = 0.0  # zero gradients: every rule's guards are exercised
    return params, grads


@needs_compiler
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cpu_kernel_is_the_pure_rule_on_numpy_bit_for_bit(case, dtype):
    rule = mvn_core.rules[case.rule]
    params, grads = _problem(dtype)
    state_dtype = "float32" if dtype == "float16" else None
    got, got_state = _kernel_steps(rule, params, grads, case.hyper, state_dtype)
    want, want_state = _pure_steps(rule, params, grads, case.hyper, state_dtype)
    for a_step, b_step in zip(got, want):
        for a, b in zip(a_step, b_step):
            np.testing.assert_array_equal(a, b)
    for a_column, b_column in zip(got_state, want_state):
        for a, b in zip(a_column, b_column):
            np.testing.assert_array_equal(a, b)


@needs_compiler
@pytest.mark.parametrize("name", KERNEL_RULES)
def test_a_negated_gradient_is_the_rule_of_minus_g(name):
    """maximize: the kernel negates the gradient as it reads it (exact)."""
    rule = mvn_core.rules[name]
    params, grads = _problem("float32", shapes=[(7,), (3, 3)])
    hyper = {"lr": 0.01, "weight_decay": 0.1}
    got, _ = _kernel_steps(rule, params, grads, hyper, negate=True)
    want, _ = _pure_steps(rule, params, [[-g for g in step] for step in grads], hyper)
    for a, b in zip(got[-1], want[-1]):
        np.testing.assert_array_equal(a, b)


def _kernel_of(name, dtype="float32", decays=True, **hyper):
    rule = mvn_core.rules[name]
    hyper = rule.tensor_rule.checked_hyperparameters({**rule.defaults, **hyper})
    c = rule.tensor_rule.scalars(npx, npx.asarray(3), np.dtype(dtype), hyper)
    trace = _elementwise.trace(rule.tensor_rule, _elementwise.describe(c),
                               dict(param=dtype, grad=dtype, state=dtype, tensor_state=dtype),
                               decays=decays)
    return trace, _c_source.cpu_kernel(trace, "step")


def test_a_schedule_changes_arguments_not_the_kernel():
    sources = {_kernel_of("adam", lr=lr, b1=b1)[1].source
               for lr, b1 in ((0.1, 0.9), (0.05, 0.8), (0.025, 0.7))}
    assert len(sources) == 1
    (source,) = sources
    assert "s_lr" in source and "s_b1" in source


def test_values_of_one_tensor_are_computed_outside_the_element_loop():
    """NovoGrad's norm-based second moment is one value per tensor: computed once per
    chunk, and stored by the tensor's first chunk only."""
    trace, kernel = _kernel_of("novograd")
    uniform = {n.name for n in trace.nodes if n.uniform}
    loop = kernel.source.split("for (int64_t i = start; i < end; ++i)")[1]
    (v_out,) = [value for name, value, _ in trace.outputs if name == "b_v"]
    assert v_out.name in uniform and f"= {v_out.name};" not in loop.split("if (start == 0)")[0]
    assert "if (start == 0)" in kernel.source


def test_constants_are_exact_literals():
    assert _elementwise.literal(0.1, np.float32) == float(np.float32(0.1)).hex() + "f"
    assert float.fromhex(_elementwise.literal(0.1, np.float64)) == 0.1
    assert _elementwise.literal(1e300, np.float32) == "((float)INFINITY)"
    assert _elementwise.round_to(0.1, "bfloat16") == 0.10009765625


def test_traced_values_have_no_truth_value():
    x = _elementwise.Value(_elementwise.Graph(), "float32", "g")
    with pytest.raises(TypeError, match="no truth value"):
        bool(x > 0)


def test_functions_outside_the_subset_are_named():
    with pytest.raises(AttributeError, match=r"exp is not in the Array-API subset .*\(.*sign"):
        _elementwise.namespace.exp
    with pytest.raises(NotImplementedError, match="sum is not elementwise"):
        _elementwise.namespace.sum(_elementwise.Value(_elementwise.Graph(), "float32", "g"))


def test_the_multi_tensor_lists_name_a_missing_function():
    pytest.importorskip("torch")
    from mvn_core.adapters import _torch_lists

    with pytest.raises(AttributeError, match=r"exp is not in the Array-API subset that "
                                             r"mvn_core.adapters._torch_lists implements "
                                             r"\(sqrt, sign, where"):
        _torch_lists.namespace.exp


OPERATORS = {  # name: (traced or NumPy elementwise function of x, on float32)
    "ne": lambda x, xp: xp.where(x != 0.5, x, -1.0 + 0 * x),
    "ge_le": lambda x, xp: xp.where((x >= -0.5) & (x <= 0.5), x, 2.0 * x),
    "rdiv_rsub": lambda x, xp: (3.0 / (x + 4.0)) - (1.0 - x),
    "neg_or": lambda x, xp: xp.where((x < -1.0) | ~(x < 1.0), -x, x * x),
    "clip": lambda x, xp: xp.clip(x, min=-0.25, max=0.75),
    "sqrt_isfinite": lambda x, xp: xp.where(xp.isfinite(1.0 / x), xp.sqrt(x * x), 0.0 * x),
}


@needs_compiler
@pytest.mark.parametrize("name", list(OPERATORS))
def test_traced_operators_compute_as_numpy(name):
    graph = _elementwise.Graph()
    x = _elementwise.Value(graph, "float32", "x")
    result = _elementwise.cast(graph.operand(OPERATORS[name](x, _elementwise.namespace)),
                               "float32")
    lines = [f"{_c_source.value_type(n.dtype)} {n.name} = {_c_source.expression(n)};"
             for n in graph.nodes]
    source = (_c_source.PRELUDE + "void f(long n, const float *in, float *out) {\n"
              "  for (long i = 0; i < n; ++i) {\n    const float x = in[i];\n    "
              + "\n    ".join(lines) + f"\n    out[i] = {_c_source._code(result)};\n  }}\n}}\n")
    f = _native.library(source).f
    values = np.concatenate([np.linspace(-2, 2, 41, dtype=np.float32), np.float32([0.0, np.inf])])
    out = np.zeros_like(values)
    f(ctypes.c_long(values.size), values.ctypes.data_as(ctypes.c_void_p),
      out.ctypes.data_as(ctypes.c_void_p))
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(out, OPERATORS[name](values, npx))


@needs_compiler
def test_square_roots_are_inlined_not_called(tmp_path):
    """A library call per element would not vectorize (-fno-math-errno makes sqrt an
    instruction): the compiled kernel must not call sqrt or sqrtf."""
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    _, kernel = _kernel_of("mvn")
    library = _native.library(kernel.source)
    symbols = subprocess.run(["nm", "-D", "--undefined-only", library._name],
                             capture_output=True, text=True, check=True).stdout.split()
    assert not {"sqrt", "sqrtf"} & set(symbols)


@needs_compiler
def test_a_warm_cache_compiles_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MVN_CORE_CACHE_DIR", str(tmp_path))
    _, kernel = _kernel_of("laprop", decays=False)
    source = kernel.source + "/* a source of this test's own */\n"
    _native.library(source)
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1
    _native._load.cache_clear()

    def no_compiler(*args, **kwargs):
        raise AssertionError("a warm start must not compile")

    monkeypatch.setattr(_native.subprocess, "run", no_compiler)
    assert hasattr(_native.library(source), "step")


def test_a_cxx_helper_is_keyed_by_the_version_of_its_library(tmp_path, monkeypatch):
    """A helper built against another library's headers is built anew for another
    version of that library (its ABI may differ), and loaded from the cache otherwise."""
    try:
        _native.cxx_compiler()
    except _native.KernelUnavailable as error:
        pytest.skip(str(error))
    monkeypatch.setenv("MVN_CORE_CACHE_DIR", str(tmp_path))
    source = 'extern "C" int mvn_answer() { return 42; }\n'
    for identity in ("library 1.0", "library 1.0", "library 2.0"):
        assert _native.library(source, cxx=True, identity=identity).mvn_answer() == 42
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 2
    assert len(list((tmp_path / "kernels").glob("*.cpp"))) == 2


def test_without_a_compiler_the_kernel_is_unavailable(monkeypatch):
    def none(*args, **kwargs):
        raise _native.KernelUnavailable("no working C compiler was found")

    monkeypatch.setattr(_native, "compiler", none)
    _cpu_kernel._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="no working C compiler"):
        assert _cpu_kernel.unavailable_reason() == "no working C compiler was found"
    params = [np.ones(3, np.float32)]
    opt = arrays.Adam([p.copy() for p in params])
    opt.step([np.full(3, 0.5, np.float32)])  # the pure rule instead
    want, _ = _pure_steps(mvn_core.rules["adam"], params, [[np.full(3, 0.5, np.float32)]], {})
    np.testing.assert_array_equal(opt.params[0], want[0][0])
    with pytest.raises(RuntimeError, match="no working C compiler"):
        arrays.Adam([np.ones(3)], fused=True).step([np.ones(3)])


def test_a_rule_the_tracer_cannot_take_falls_back(monkeypatch):
    """A rule calling a function kernels lack runs its pure path, after a warning."""
    rule = mvn_core.rules["adam"]

    def direction(xp, g, p, buffers, c):
        m, v = buffers
        return xp.exp(g), (m, v)

    odd = rule.tensor_rule.__class__(**{**vars(rule.tensor_rule), "direction": direction,
                                        "name": "odd"})
    c = odd.scalars(npx, npx.asarray(1), np.dtype("float32"), odd.checked_hyperparameters(
        dict(rule.defaults)))
    _cpu_kernel._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="exp is not in the Array-API subset"):
        assert not _cpu_kernel.buildable(odd, c, ("float32",) * 3, False)
