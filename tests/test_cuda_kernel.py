"""The CUDA C kernel of the CuPy optimizers (``adapters/_cuda_source.py``,
``adapters/_cupy_fused.py``).

Without a GPU: the generated source compiles with nvcc as device code, whose PTX
rounds every operation to nearest (no fused multiply-add, no approximate division or
square root, subnormals kept); the same source compiled as host code by the C++
compiler (a block per call, one thread) runs the CuPy path's launches on CPU tensors,
whose parameters must equal the rule's mathematics in IEEE arithmetic bit for bit, for
every rule, setting and dtype layout CuPy has; its float16 conversions are checked
against NumPy's on every float16 and on float32 values around every rounding boundary.
On a GPU with CuPy, the CuPy optimizers' ``fused=True`` path is checked bit for bit
(``pytest -k cupy``).
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import array_api_compat.torch as tx
import numpy as np
import pytest

import mvn_core
from mvn_core import backends
from mvn_core.adapters import _cpu_kernel, _cuda_source, _elementwise, _gpu_kernel, arrays
from mvn_core.conformance.cases import cases
from mvn_core.conformance.problems import make_problem
from mvn_core.conformance.trajectories import ieee_trajectory

torch = pytest.importorskip("torch")

KERNEL_RULES = [n for n, r in mvn_core.rules.items() if r.tensor_rule is not None]
DTYPES = ("float32", "float64", "float16")  # float16 with float32 state; CuPy has no bfloat16
JOBS = [(c, d) for c in cases(KERNEL_RULES) for d in DTYPES]
SHAPES = ((), (0, 3), (2, 19))  # 0-d, empty, and two chunks of the test's size
STEPS = 3
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("clang++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no CUDA compiler (nvcc)")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++ or clang++)")
CUPY = backends.get("cupy").unavailable_reason()
needs_cupy = pytest.mark.skipif(CUPY is not None, reason=CUPY or "")

# The kernel as host code: the device intrinsics by memcpy, a launch as a loop over the
# blocks with one thread each.
HOST = r"""#include <math.h>
#include <string.h>
#define MVN_FN static inline
static inline unsigned int mvn_host_bits(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline float mvn_host_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline double mvn_host_double(long long b) { double d; memcpy(&d, &b, 8); return d; }
#define MVN_BITS(f) mvn_host_bits(f)
#define MVN_FLOAT(u) mvn_host_float(u)
#define MVN_DOUBLE(b) mvn_host_double(b)
static inline long long mvn_host_double_bits(double d) { long long b; memcpy(&b, &d, 8); return b; }
#define MVN_DOUBLE_BITS(d) mvn_host_double_bits(d)
#define __global__
struct mvn_dim { unsigned int x; };
static mvn_dim blockIdx, threadIdx, blockDim = {1};
"""
LAUNCH = r"""
extern "C" void launch_{name}(long long blocks, const long long *meta, long long n_chunks,
        long long K, long long chunk, const double *arrays, const double *stats,
        const double *old) {{
    for (long long b = 0; b < blocks; ++b) {{
        blockIdx.x = (unsigned int)b;
        {name}(meta, n_chunks, K, chunk, arrays, stats, old);
    }}
}}
"""
CONVERSIONS = r"""
extern "C" void f16_loads(const unsigned short *h, float *out, long n) {
    for (long i = 0; i < n; ++i) out[i] = mvn_f16_load(h[i]);
}
extern "C" void f16_stores(const float *f, unsigned short *out, long n) {
    for (long i = 0; i < n; ++i) out[i] = mvn_f16_store(f[i]);
}
"""


def _host_library(folder, body: str) -> ctypes.CDLL:
    source, library = folder / "kernels.cpp", folder / "kernels.so"
    source.write_text(HOST + _cuda_source.PRELUDE + body)
    run = subprocess.run([CXX, "-x", "c++", "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC",
                          "-shared", "-w", "-o", str(library), str(source)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return ctypes.CDLL(str(library))


def _kernel(name, dtype, **hyper):
    rule = mvn_core.rules[name]
    hyper = rule.tensor_rule.checked_hyperparameters({**rule.defaults, **hyper})
    compute = "float32" if dtype == "float16" else dtype
    c = rule.tensor_rule.scalars(tx, torch.asarray(3), getattr(torch, compute), hyper)
    trace = _cpu_kernel.traced(rule.tensor_rule, _elementwise.describe(c),
                               (dtype, dtype, compute, compute), True)
    return _cuda_source.cuda_kernel(trace, f"mvn_core_{name}_step")


# The rules' kernels with weight decay in float32, and MVN-Grad's and NovoGrad's in the
# other layouts.
COMPILED = [(n, "float32") for n in KERNEL_RULES] + [
    (n, d) for n in ("mvn", "novograd") for d in DTYPES[1:]]


@needs_nvcc
@pytest.mark.parametrize("name,dtype", COMPILED, ids=[f"{n}-{d}" for n, d in COMPILED])
def test_the_cuda_kernel_compiles_and_rounds_every_operation_to_nearest(tmp_path, name, dtype,
                                                                          assert_ieee_ptx):
    """nvcc, with the options CuPy's NVRTC gets, for an H100 (sm_90)."""
    source = tmp_path / "kernel.cu"
    source.write_text(_kernel(name, dtype, weight_decay=0.1).source)
    run = subprocess.run([NVCC, "-ptx", "-arch=sm_90", *_cuda_source.OPTIONS, "-o",
                          str(tmp_path / "kernel.ptx"), str(source)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert_ieee_ptx((tmp_path / "kernel.ptx").read_text(), "f64" if dtype == "float64" else "f32",
                    name)


@needs_cxx
def test_float16_conversions_are_numpys(tmp_path):
    library = _host_library(tmp_path, CONVERSIONS)
    halves = np.arange(1 << 16, dtype=np.uint16)
    loaded = np.empty(halves.size, dtype=np.float32)
    library.f16_loads(halves.ctypes.data_as(ctypes.c_void_p), loaded.ctypes.data_as(ctypes.c_void_p),
                      ctypes.c_long(halves.size))
    np.testing.assert_array_equal(loaded, halves.view(np.float16).astype(np.float32))
    # every float16, the float32 values halfway between neighbours and one float32 ulp
    # either side of those, and random bits
    finite = np.sort(halves.view(np.float16)[np.isfinite(halves.view(np.float16))].astype(np.float32))
    middles = ((finite[1:].astype(np.float64) + finite[:-1]) / 2).astype(np.float32)
    values = np.concatenate([
        finite, middles, np.nextafter(middles, np.float32(np.inf)),
        np.nextafter(middles, np.float32(-np.inf)), np.float32([65504, 65519.99, 65520, 1e30,
                                                                np.inf, -np.inf, np.nan]),
        np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint32).view(np.float32)])
    stored = np.empty(values.size, dtype=np.uint16)
    library.f16_stores(values.ctypes.data_as(ctypes.c_void_p), stored.ctypes.data_as(ctypes.c_void_p),
                       ctypes.c_long(values.size))
    with np.errstate(over="ignore", invalid="ignore"):
        want = values.astype(np.float16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(stored[~nan], want[~nan].view(np.uint16))
    assert np.isnan(stored[nan].view(np.float16)).all()


class _HostKernels:
    """The CUDA kernels of every job, compiled as host code in one library; the
    ``build`` of a :class:`~mvn_core.adapters._gpu_kernel.Kernels` that launches them."""

    def __init__(self, folder):
        self.folder, self.sources, self.library = folder, {}, None

    def collect(self, trace, name):
        kernel = _cuda_source.cuda_kernel(trace, name)
        self.sources.setdefault(kernel.source, f"k{len(self.sources)}")
        return kernel, None

    def compile(self):
        body = "".join(source.replace(_cuda_source.PRELUDE, "").replace(
            "void mvn_core_", f"void {name}_mvn_core_") + LAUNCH.format(name=_entry(source, name))
            for source, name in self.sources.items())
        self.library = _host_library(self.folder, body)

    def build(self, trace, name):
        kernel = _cuda_source.cuda_kernel(trace, name)
        fn = getattr(self.library, f"launch_{_entry(kernel.source, self.sources[kernel.source])}")
        return kernel, fn


def _entry(source: str, prefix: str) -> str:
    return prefix + "_" + re.search(r"void (mvn_core_\w+)\(", source).group(1)


def _host_steps(job, kernels: _gpu_kernel.Kernels, launch):
    """The CuPy path's launches, on CPU tensors, through ``kernels``: the parameters
    after each step (run ``launch(fn, Launch)`` for each)."""
    case, dtype = job
    rule = mvn_core.rules[case.rule]
    tensor_rule = rule.tensor_rule
    problem = make_problem(STEPS, seed=5, shapes=SHAPES)
    params = [torch.tensor(p, dtype=getattr(torch, dtype)) for p in problem.params]
    state = rule.init(params, state_dtype=torch.float32 if dtype == "float16" else None)
    hyper = tensor_rule.checked_hyperparameters({**rule.defaults, **case.hyper})
    decays = tensor_rule.decays(hyper)
    columns, count, out = list(state[1:]), state.count, []
    for grads in problem.grads:
        grads = [torch.tensor(g, dtype=getattr(torch, dtype)) for g in grads]
        count = count + 1
        planned, rest = _cpu_kernel.plan(tx, tensor_rule, params, grads, columns, count, hyper,
                                         decays, lambda i: True, build=kernels.buildable)
        assert not rest

        def compiled(batch):
            return kernels.compiled(tensor_rule, _elementwise.describe(batch.step_scalars), batch.names,
                                    decays)

        for fn, one in _gpu_kernel.launches(tx, tensor_rule, planned, params, grads, columns,
                                            torch.Tensor.data_ptr, torch.Tensor.numel, compiled):
            launch(fn, one)
        out.append([p.double().numpy().copy() for p in params])
    return out


def _run_on_host(fn, launch: _gpu_kernel.Launch):
    if launch.n_chunks == 0:
        return
    meta = np.ascontiguousarray(launch.metadata)
    doubles = [np.zeros(1) if a is None else a.numpy() for a in (launch.arrays, launch.stats,
                                                                 launch.old)]
    pointer = ctypes.c_void_p
    fn(ctypes.c_longlong(launch.n_chunks), meta.ctypes.data_as(pointer),
       ctypes.c_longlong(launch.n_chunks), ctypes.c_longlong(launch.n_tensors),
       ctypes.c_longlong(_gpu_kernel.CHUNK), *(d.ctypes.data_as(pointer) for d in doubles))


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """Every job's kernels compiled as host code (one compiler run), with chunks of 32
    elements: a tensor spans several."""
    host = _HostKernels(tmp_path_factory.mktemp("cuda-host"))
    collecting = _gpu_kernel.Kernels(host.collect)
    for job in JOBS:
        _host_steps(job, collecting, lambda fn, launch: None)
    host.compile()
    return _gpu_kernel.Kernels(host.build)


@needs_cxx
@pytest.mark.parametrize("job", JOBS, ids=[f"{c.id}-{d}" for c, d in JOBS])
def test_the_cuda_kernel_as_host_code_is_the_rule_in_ieee_arithmetic(host_kernels, job,
                                                                     monkeypatch):
    monkeypatch.setattr(_gpu_kernel, "CHUNK", 32)
    case, dtype = job
    got = _host_steps(job, host_kernels, _run_on_host)
    problem = make_problem(STEPS, seed=5, shapes=SHAPES)
    want = ieee_trajectory(case.rule, "torch", problem, dtype=dtype,
                           state_dtype="float32" if dtype == "float16" else None, **case.hyper)
    for step_got, step_want in zip(got, want):
        for a, b in zip(step_got, step_want):
            np.testing.assert_array_equal(a, b)


@needs_cupy
@pytest.mark.parametrize("job", JOBS, ids=[f"{c.id}-{d}" for c, d in JOBS])
def test_cupy_fused_is_the_rule_in_ieee_arithmetic(job):
    """On a GPU: the CuPy optimizers' fused=True path equals the rule's mathematics in
    IEEE arithmetic from CuPy's own step scalars and statistics, bit for bit."""
    import cupy

    case, dtype = job
    problem = make_problem(6, seed=3)
    state_dtype = "float32" if dtype == "float16" else None
    params = [cupy.asarray(p, dtype=dtype) for p in problem.params]
    opt = arrays.OPTIMIZERS[case.rule](params, fused=True, state_dtype=state_dtype, **case.hyper)
    for grads in problem.grads:
        opt.step([cupy.asarray(g, dtype=dtype) for g in grads])
    want = ieee_trajectory(case.rule, "cupy", problem, dtype=dtype, state_dtype=state_dtype,
                           **case.hyper)[-1]
    for p, w in zip(params, want):
        np.testing.assert_array_equal(cupy.asnumpy(p).astype(np.float64), w)


@needs_cupy
def test_cupy_fused_builds_one_kernel_under_a_schedule_and_refuses_what_it_cannot_take():
    import cupy

    from mvn_core.adapters import _cupy_fused

    params = [cupy.ones((3, 4), dtype=cupy.float32), cupy.zeros(5, dtype=cupy.float32)]
    opt = arrays.NovoGrad(params, fused=True, lr=0.01, weight_decay=0.1)
    for step in range(4):
        opt.hyperparameters["lr"] = 0.01 * 0.9 ** step
        opt.step([cupy.full_like(p, 0.5) for p in params])
        if step == 0:
            built = _cupy_fused.KERNELS.count()
    assert _cupy_fused.KERNELS.count() == built
    with pytest.raises(ValueError, match="arrays"):  # the rule's own checks come first
        opt.step([cupy.ones(3)])
    strided = [cupy.ones((4, 6), dtype=cupy.float32)[:, ::2]]
    with pytest.raises(ValueError, match="C-contiguous"):
        arrays.Adam(strided, fused=True).step([cupy.ones((4, 3), dtype=cupy.float32)])
