"""The fused elementwise path: a rule's pure mathematics traced into one kernel body.

The body is C++; here it is compiled for the CPU with g++ (without contraction into
fused multiply-adds) and must reproduce the pure rule bit for bit, for every
per-coordinate rule; nvcc must accept it as CUDA device code; and on a GPU the CuPy
optimizers' ``fused=True`` path must reproduce the pure rule on CuPy bit for bit.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

import mvn_core
from mvn_core.adapters import _elementwise, arrays
from mvn_core import backends

PER_COORDINATE = [n for n, r in mvn_core.rules.items() if r.per_coordinate]
OPTIONS = {"mvn": [{}, {"coupled_weight_decay": True}], "adam": [{}, {"coupled_weight_decay": True}],
           "adabelief": [{}, {"rectify": True}], "sgd": [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}],
           "laprop": [{}], "maxva": [{}, {"b2_min": 0.9, "b2_max": 0.99}]}
CASES = [(n, o) for n in PER_COORDINATE for o in OPTIONS[n]]
C_ARG = {"float": ctypes.c_float, "double": ctypes.c_double, "bool": ctypes.c_bool}


def _value(x):
    return x.item() if hasattr(x, "item") else x


def _numpy_scalars(rule, count, dtype, hyper):
    import array_api_compat.numpy as xp

    return rule.tensor_rule.scalars(xp, xp.asarray(count), np.dtype(dtype), hyper)


def _cpp_source(kernel):
    """The body in a plain loop over pointers (what CuPy's ElementwiseKernel wraps it in)."""
    args = ["long n"] + [f"const {t}* g_" if n == "g" else f"{t} {n}" for n, t in kernel.inputs]
    args += [f"{t}* {n}_" for n, t in kernel.outputs]
    refs = [f"const {dict(kernel.inputs)['g']} g = g_[i];"]
    refs += [f"{t}& {n} = {n}_[i];" for n, t in kernel.outputs]
    return ("#include <cmath>\nusing std::sqrt; using std::isfinite;\n"
            f"extern \"C\" void step({', '.join(args)}) {{\n"
            "  for (long i = 0; i < n; ++i) {\n" + "\n".join(refs) + "\n" + kernel.body + "\n  }\n}\n")


def _build(kernel, tmp_path):
    source, library = tmp_path / "kernel.cpp", tmp_path / "kernel.so"
    source.write_text(_cpp_source(kernel))
    subprocess.run(["g++", "-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math",
                    "-shared", "-fPIC", "-o", str(library), str(source)],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(library))


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++)")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}{o}" for n, o in CASES])
def test_traced_kernel_is_the_pure_rule_bit_for_bit(tmp_path, name, options, dtype):
    rule = mvn_core.rules[name]
    hyper = rule.tensor_rule.checked_hyperparameters(
        dict(rule.defaults, **options, lr=0.01, weight_decay=0.1))
    rng = np.random.default_rng(1)
    n = 4096
    params = [rng.standard_normal(n).astype(dtype)]
    state = rule.init(params)
    kernel = _elementwise.trace(rule.tensor_rule, _numpy_scalars(rule, 1, dtype, hyper),
                                dict(param=dtype, grad=dtype, state=dtype), decays=True)
    step = _build(kernel, tmp_path).step
    mine, buffers = params[0].copy(), [b[0].copy() for b in state[1:]]
    for _ in range(6):
        g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(dtype)
        g[:16] = 0.0  # zero gradients: the guards of every rule are exercised too
        updates, state = rule.update(state, [g], params, **hyper)
        params = mvn_core.apply_updates(params, updates)
        c = _numpy_scalars(rule, int(state.count), dtype, hyper)
        args = [ctypes.c_long(n), g.ctypes.data_as(ctypes.c_void_p)]
        args += [C_ARG[t](_value(getattr(c, s[2:]))) for s, t in kernel.inputs[1:]]
        args += [a.ctypes.data_as(ctypes.c_void_p) for a in (mine, *buffers)]
        step(*args)
        np.testing.assert_array_equal(mine, params[0])
        for ours, theirs in zip(buffers, state[1:]):
            np.testing.assert_array_equal(ours, theirs[0])


def test_per_tensor_rules_cannot_be_traced():
    rule = mvn_core.rules["novograd"]
    hyper = rule.tensor_rule.checked_hyperparameters(dict(rule.defaults))
    with pytest.raises(NotImplementedError, match="sum is not elementwise"):
        _elementwise.trace(rule.tensor_rule, _numpy_scalars(rule, 1, "float32", hyper),
                           dict(param="float32", grad="float32", state="float32"), decays=False)


def test_constants_are_exact_literals():
    assert _elementwise.literal(0.1, np.float32) == float(np.float32(0.1)).hex() + "f"
    assert float.fromhex(_elementwise.literal(0.1, np.float64)) == 0.1
    assert _elementwise.literal(1e300, np.float32) == "((float)INFINITY)"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler (nvcc)")
def test_traced_kernel_compiles_as_cuda_device_code(tmp_path):
    rule = mvn_core.rules["maxva"]  # the most operations: where, clip, isfinite, bools
    hyper = rule.tensor_rule.checked_hyperparameters(dict(rule.defaults, weight_decay=0.1))
    kernel = _elementwise.trace(rule.tensor_rule, _numpy_scalars(rule, 1, "float32", hyper),
                                dict(param="float32", grad="float32", state="float32"), decays=True)
    body = _cpp_source(kernel).replace("#include <cmath>\nusing std::sqrt; using std::isfinite;\n", "")
    body = body.replace('extern "C" void', "__global__ void").replace(
        "  for (long i = 0; i < n; ++i) {", "  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += gridDim.x * (long)blockDim.x) {")
    source = tmp_path / "kernel.cu"
    source.write_text(body)
    run = subprocess.run(["nvcc", "-c", "--fmad=false", "-std=c++17", "-o", str(tmp_path / "k.o"),
                          str(source)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_fused_needs_cupy_and_a_per_coordinate_rule():
    with pytest.raises(ValueError, match="needs CuPy arrays"):
        arrays.MVNGrad([np.ones(3)], fused=True)
    with pytest.raises(TypeError, match="fused must be True or False"):
        arrays.MVNGrad([np.ones(3)], fused=1)


CUPY = backends.get("cupy").unavailable_reason()


@pytest.mark.skipif(CUPY is not None, reason=CUPY or "")
@pytest.mark.parametrize("name", PER_COORDINATE)
def test_cupy_fused_path_is_the_pure_rule_bit_for_bit(name):
    import cupy

    rule = mvn_core.rules[name]
    rng = np.random.default_rng(3)
    shapes = [(513, 7), (33,), (), (0, 4)]
    host = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    fused_params = [cupy.asarray(h) for h in host]
    plain_params = [cupy.asarray(h) for h in host]
    extra = {"momentum": 0.9} if name == "sgd" else {}
    fused = arrays.OPTIMIZERS[name](fused_params, fused=True, lr=0.01, weight_decay=0.1, **extra)
    plain = arrays.OPTIMIZERS[name](plain_params, lr=0.01, weight_decay=0.1, **extra)
    from mvn_core.adapters import _cupy_fused

    for step in range(5):
        for opt in (fused, plain):  # a schedule: arguments change, the kernel does not
            opt.hyperparameters["lr"] = 0.01 * 0.9 ** step
        grads = [cupy.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
        fused.step(grads)
        plain.step(grads)
        if step == 0:
            kernels = _cupy_fused._compiled.cache_info().currsize
    assert _cupy_fused._compiled.cache_info().currsize == kernels
    for a, b in zip(fused_params, plain_params):
        cupy.testing.assert_array_equal(a, b)
    for a, b in zip(fused.state[1:], plain.state[1:]):
        for x, y in zip(a, b):
            cupy.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="arrays"):  # the rule's own checks come first
        fused.step(grads[:1])


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++)")
@pytest.mark.parametrize("name", ["mvn", "maxva"])
def test_traced_kernel_without_decay_and_with_wider_state(tmp_path, name):
    """float32 parameters and gradients with float64 state, weight decay off."""
    rule = mvn_core.rules[name]
    hyper = rule.tensor_rule.checked_hyperparameters(dict(rule.defaults, lr=0.01))
    rng = np.random.default_rng(2)
    n = 1000
    params = [rng.standard_normal(n).astype(np.float32)]
    state = rule.init(params, state_dtype="float64")
    kernel = _elementwise.trace(rule.tensor_rule, _numpy_scalars(rule, 1, "float64", hyper),
                                dict(param="float32", grad="float32", state="float64"),
                                decays=False)
    step = _build(kernel, tmp_path).step
    mine, buffers = params[0].copy(), [b[0].copy() for b in state[1:]]
    for _ in range(4):
        g = rng.standard_normal(n).astype(np.float32)
        updates, state = rule.update(state, [g], params, **hyper)
        params = mvn_core.apply_updates(params, updates)
        c = _numpy_scalars(rule, int(state.count), "float64", hyper)
        args = [ctypes.c_long(n), g.ctypes.data_as(ctypes.c_void_p)]
        args += [C_ARG[t](_value(getattr(c, s[2:]))) for s, t in kernel.inputs[1:]]
        args += [a.ctypes.data_as(ctypes.c_void_p) for a in (mine, *buffers)]
        step(*args)
        np.testing.assert_array_equal(mine, params[0])


def test_a_schedule_changes_arguments_not_the_kernel():
    rule = mvn_core.rules["adam"]
    bodies = set()
    for lr in (0.1, 0.05, 0.025):
        hyper = rule.tensor_rule.checked_hyperparameters(dict(rule.defaults, lr=lr, b1=0.8))
        kernel = _elementwise.trace(rule.tensor_rule, _numpy_scalars(rule, 3, "float32", hyper),
                                    dict(param="float32", grad="float32", state="float32"),
                                    decays=False)
        bodies.add(kernel.body)
        assert "s_lr" in kernel.body and "s_b1" in kernel.body
    assert len(bodies) == 1


OPERATORS = {  # name: (traced or NumPy elementwise function of x, on float32)
    "ne": lambda x, xp: xp.where(x != 0.5, x, -1.0 + 0 * x),
    "ge_le": lambda x, xp: xp.where((x >= -0.5) & (x <= 0.5), x, 2.0 * x),
    "rdiv_rsub": lambda x, xp: (3.0 / (x + 4.0)) - (1.0 - x),
    "neg_or": lambda x, xp: xp.where((x < -1.0) | ~(x < 1.0), -x, x * x),
    "clip": lambda x, xp: xp.clip(x, min=-0.25, max=0.75),
}


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++)")
@pytest.mark.parametrize("name", list(OPERATORS))
def test_traced_operators_compute_as_numpy(tmp_path, name):
    import array_api_compat.numpy as xp

    graph = _elementwise.Graph()
    x = _elementwise.Symbol(graph, np.dtype(np.float32), "g")
    result = OPERATORS[name](x, _elementwise.namespace)
    kernel = _elementwise.Kernel((("g", "float"),), (("p", "float"),), (),
                                 "\n".join(graph.lines + [f"p = {result.code};"]))
    step = _build(kernel, tmp_path).step
    values = np.linspace(-2, 2, 41, dtype=np.float32)
    out = np.zeros_like(values)
    step(ctypes.c_long(values.size), values.ctypes.data_as(ctypes.c_void_p),
         out.ctypes.data_as(ctypes.c_void_p))
    np.testing.assert_array_equal(out, OPERATORS[name](values, xp))


def test_traced_values_have_no_truth_value():
    x = _elementwise.Symbol(_elementwise.Graph(), np.dtype(np.float32), "g")
    with pytest.raises(TypeError, match="no truth value"):
        bool(x > 0)
