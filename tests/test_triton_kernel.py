"""The Triton kernel of the torch optimizers on CUDA (``adapters/_triton_kernel.py``).

Without a GPU it is tested twice over: run by Triton's interpreter on CPU tensors
(``workers/triton_interpreted.py``, in processes of their own with
``TRITON_INTERPRET=1``), where its parameters must equal the rule's mathematics in IEEE
arithmetic bit for bit, for every rule with per-tensor mathematics, every setting of
the check and four dtype layouts; and compiled by Triton for an NVIDIA GPU (sm_90, no
GPU needed), whose PTX must round every operation to nearest, as IEEE arithmetic does:
no fused multiply-add, no approximate division or square root, no flushing of
subnormals.  On a CUDA device the torch optimizers' trajectories are checked too.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import array_api_compat.numpy as npx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mvn_core  # noqa: E402
from mvn_core.adapters import _elementwise, _triton_kernel  # noqa: E402
from mvn_core.adapters import torch as adapters  # noqa: E402
from mvn_core.conformance.cases import cases  # noqa: E402
from mvn_core.conformance.problems import make_problem  # noqa: E402
from mvn_core.conformance.trajectories import ieee_trajectory  # noqa: E402

TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton is not installed")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
WORKER = Path(__file__).parent / "workers" / "triton_interpreted.py"
TIMEOUT = 900  # seconds for each worker: about 60 on a busy 2-core machine
KERNEL_RULES = [n for n, r in mvn_core.rules.items() if r.tensor_rule is not None]
DTYPES = ("float32", "float64", "bfloat16", "float16")  # half formats with float32 state
JOBS = [f"{c.rule}|{c.label}|{d}" for c in cases(KERNEL_RULES) for d in DTYPES]
SCHEDULES = ["schedule|float32", "schedule|bfloat16"]
FALLBACK = "fallback|float32"
EXTRA_JOBS = [*SCHEDULES, FALLBACK]


@pytest.fixture(scope="module")
def report():
    """Every job's result, from two interpreter processes side by side."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    jobs = JOBS + EXTRA_JOBS
    halves = [jobs[0::2], jobs[1::2]]

    def run(half):
        return subprocess.run([sys.executable, str(WORKER), *half], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)

    with concurrent.futures.ThreadPoolExecutor(len(halves)) as pool:
        outs = list(pool.map(run, halves))
    merged = {}
    for out in outs:
        assert out.returncode == 0, out.stderr[-3000:]
        merged.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return merged


def _assert_equal(record):
    assert record["error"] is None, record["error"]
    assert record["equal"], f"differs by up to {record['max_diff']}"


@needs_triton
@pytest.mark.parametrize("job", JOBS, ids=[j.replace("|", "-") for j in JOBS])
def test_interpreted_triton_kernel_is_the_rule_in_ieee_arithmetic(report, job):
    _assert_equal(report[job])


@needs_triton
@pytest.mark.parametrize("job", SCHEDULES)
def test_a_schedule_and_maximize_change_arguments_not_the_kernel(report, job):
    """A tensor lr and b1 moved every step, with maximize: the C kernel's parameters,
    bit for bit, from one Triton kernel built for all the steps."""
    _assert_equal(report[job])
    assert report[job]["kernels_built"] == 1


@needs_triton
def test_a_tensor_the_kernel_cannot_take_is_refused_or_runs_the_multi_tensor_path(report):
    """Not contiguous: fused=True refuses it, writing nothing; by default it runs the
    multi-tensor path, the others the kernel, as on the CPU (bit for bit)."""
    record = report[FALLBACK]
    assert record["refused"] and record["unchanged"]
    _assert_equal(record)


def _kernel(name, dtype, **hyper):
    rule = mvn_core.rules[name]
    hyper = rule.tensor_rule.checked_hyperparameters({**rule.defaults, **hyper})
    compute = "float32" if dtype in ("bfloat16", "float16") else dtype
    c = rule.tensor_rule.scalars(npx, npx.asarray(3), np.dtype(compute), hyper)
    names = (dtype, dtype, compute, compute)
    return _triton_kernel.KERNELS.compiled(rule.tensor_rule, _elementwise.describe(c), names, True)


# The rules' kernels with weight decay in float32, and MVN-Grad's in the other layouts.
COMPILED = [(n, "float32") for n in KERNEL_RULES] + [("mvn", d) for d in DTYPES[1:]]


@needs_triton
@pytest.mark.parametrize("name,dtype", COMPILED, ids=[f"{n}-{d}" for n, d in COMPILED])
def test_the_compiled_kernel_rounds_every_operation_to_nearest(name, dtype, assert_ieee_ptx):
    """Compiled by Triton for an H100 (sm_90; no GPU is needed to compile): the PTX has
    no fused multiply-add, only correctly rounded division and square root, no flushing
    of subnormals to zero, and reads aligned blocks in vectors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend")
    _, fn = _kernel(name, dtype, weight_decay=0.1)
    signature = {"meta": "*i64", "n_chunks": "i32", "K": "i32", "chunk": "i32",
                 "arrays": "*fp64", "stats": "*fp64", "old": "*fp64",
                 "BLOCK": "constexpr", "ALIGNED": "constexpr"}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={"BLOCK": _triton_kernel.BLOCK, "ALIGNED": True})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                         options={**_triton_kernel.OPTIONS, "num_warps": _triton_kernel.WARPS}
                         ).asm["ptx"]
    instructions = assert_ieee_ptx(ptx, "f64" if dtype == "float64" else "f32", name)
    assert {i for i in instructions if i.startswith("ld.global.v")}


def test_the_interpreted_cpu_path_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with _triton_kernel.interpreted_on_cpu():
            pass
    assert not _triton_kernel.steps_on(torch.device("cpu"))
    assert _triton_kernel.steps_on(torch.device("cuda"))


def test_cuda_tensors_without_triton_or_under_its_interpreter_are_said_why(monkeypatch):
    """The reason the kernel path falls back (after one warning) or fused=True refuses."""
    cuda = torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "runs CPU tensors only" in _triton_kernel.unavailable_reason(cuda)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(_triton_kernel.importlib.util, "find_spec",
                        lambda name: None if name == "triton" else importlib.util.find_spec(name))
    assert _triton_kernel.unavailable_reason(cuda) == ("Triton is not installed "
                                                       "(pip install triton)")


def test_constants_and_half_formats_are_printed_exactly():
    assert _triton_kernel._constant(0.1, "float64") == "tl.full([], 0.1, tl.float64)"
    single = float(np.float32(0.1))
    assert _triton_kernel._constant(single, "float32") == f"tl.full([], {single!r}, tl.float32)"
    assert float(repr(single)) == single
    assert _triton_kernel._constant(-float("inf"), "float32") == "tl.full([], -INF, tl.float32)"
    kernel, _ = _kernel("mvn", "bfloat16")
    assert "bf16_store(" in kernel.source and "round_bf16(" in kernel.source
    assert "tl.math.div_rn(" in kernel.source and "tl.math.sqrt_rn(" in kernel.source


@CUDA
@needs_triton
@pytest.mark.parametrize("name", KERNEL_RULES)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_cuda_fused_is_the_rule_in_ieee_arithmetic(name, dtype):
    """On a GPU: the Triton kernel (fused=True) equals the rule's mathematics in IEEE
    arithmetic from the GPU's own step scalars and statistics, bit for bit."""
    problem = make_problem(6, seed=4)
    rule = mvn_core.rules[name]
    cls = getattr(adapters, rule.class_name)
    hyper = {"lr": 1e-2, "weight_decay": 0.1, **({"momentum": 0.9} if name == "sgd" else {})}
    state_dtype = "float32" if dtype == "bfloat16" else None
    params = [torch.tensor(p, dtype=getattr(torch, dtype), device="cuda", requires_grad=True)
              for p in problem.params]
    from mvn_core.conformance.paths import torch_arguments

    opt = cls(params, fused=True, state_dtype=state_dtype and torch.float32,
              **torch_arguments(cls, hyper))
    for grads in problem.grads:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=p.dtype, device="cuda")
        opt.step()
    want = ieee_trajectory(name, "torch", problem, dtype=dtype, device="cuda",
                           state_dtype=state_dtype, **hyper)[-1]
    for p, w in zip(params, want):
        np.testing.assert_array_equal(p.detach().double().cpu().numpy(), w)
