"""The interpreted half of ``tests/test_triton_kernel.py``: run in a process of its own
with ``TRITON_INTERPRET=1`` (read when a kernel is defined), so that the Triton kernel
of the torch optimizers runs on CPU tensors, its operations computed by NumPy.

    TRITON_INTERPRET=1 python triton_interpreted.py JOB...

A job is ``RULE|SETTING|DTYPE`` (a case of :func:`mvn_core.conformance.cases.cases`,
by its label, and the params' dtype; half formats keep float32 state), or
``schedule|DTYPE`` or ``fallback|DTYPE`` (see their functions).  Prints one JSON line:
per job, whether the kernel's parameters equal
:func:`~mvn_core.conformance.trajectories.ieee_trajectory`'s (or the CPU path's) bit
for bit at every step, the largest difference and the error, if any.  Chunks and
blocks are made small, so that tensors span several chunks and chunks end in partial
blocks.
"""

from __future__ import annotations

import json
import sys
import traceback

import numpy as np
import torch

import mvn_core
from mvn_core.adapters import _gpu_kernel, _triton_kernel
from mvn_core.adapters import torch as adapters
from mvn_core.conformance.cases import cases
from mvn_core.conformance.paths import torch_arguments
from mvn_core.conformance.problems import make_problem
from mvn_core.conformance.trajectories import ieee_trajectory

# 0-d, empty, and a tensor of two chunks, the second ending in a partial block
SHAPES = ((), (0, 3), (2, 19))
STEPS = 2  # the first step (a case of its own in MaxVA and NovoGrad) and one after
HALF = ("bfloat16", "float16")


def trajectory(cls, options: dict, problem, dtype: str, state_dtype, schedule=None) -> list:
    params = [torch.tensor(p, dtype=getattr(torch, dtype), requires_grad=True)
              for p in problem.params]
    opt = cls(params, fused=True, state_dtype=state_dtype, **options)
    out = []
    for step, grads in enumerate(problem.grads):
        if schedule is not None:
            schedule(opt, step)
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=p.dtype)
        opt.step()
        out.append([p.detach().double().numpy().copy() for p in params])
    return out


def compared(got: list, want: list) -> dict:
    pairs = [(a, np.asarray(b, dtype=np.float64))
             for sa, sb in zip(got, want) for a, b in zip(sa, sb)]
    equal = all(np.array_equal(a, b, equal_nan=True) for a, b in pairs)
    diff = max((float(np.max(np.abs(a - b), initial=0.0)) for a, b in pairs), default=0.0)
    return {"equal": equal and len(got) == len(want), "max_diff": diff, "error": None}


def case_job(rule_name: str, label: str, dtype: str) -> dict:
    (case,) = [c for c in cases([rule_name]) if c.label == label]
    cls = getattr(adapters, mvn_core.rules[rule_name].class_name)
    problem = make_problem(STEPS, seed=7, shapes=SHAPES)
    state_dtype = "float32" if dtype in HALF else None
    with _triton_kernel.interpreted_on_cpu():
        got = trajectory(cls, torch_arguments(cls, case.hyper), problem, dtype,
                         state_dtype and torch.float32)
    want = ieee_trajectory(rule_name, "torch", problem, dtype=dtype, state_dtype=state_dtype,
                           **case.hyper)
    return compared(got, want)


def schedule_job(dtype: str) -> dict:
    """A tensor learning rate and b1 moved between steps, with ``maximize``: the
    kernel's arguments change, the kernel does not (one kernel built for all steps);
    the parameters are those of the CPU's generated kernel (C, also IEEE arithmetic)
    under the same schedule, bit for bit."""
    problem = make_problem(STEPS, seed=8, shapes=SHAPES)

    def schedule(opt, step):
        opt.param_groups[0]["lr"].fill_(0.01 * 0.5 ** step)
        opt.param_groups[0]["betas"] = (0.9 - 0.1 * step, 0.999)

    def run():
        options = {"lr": torch.tensor(0.01), "maximize": True, "weight_decay": 0.1}
        return trajectory(adapters.Adam, options, problem, dtype, None, schedule)

    kernels = _triton_kernel.KERNELS.count()
    with _triton_kernel.interpreted_on_cpu():
        got = run()
    result = compared(got, run())  # outside: the C kernel
    result["kernels_built"] = _triton_kernel.KERNELS.count() - kernels
    return result


def fallback_job(dtype: str) -> dict:
    """A parameter that is not contiguous: ``fused=True`` refuses it before anything is
    written; by default it runs the multi-tensor path beside the kernel's launch, so
    the parameters are those of the CPU path (the C kernel, and the multi-tensor path
    for that one) bit for bit."""
    problem = make_problem(STEPS, seed=9, shapes=((4, 6), (7,)))
    first, second = (np.asarray(p) for p in problem.params)

    def make(**options):
        transposed = torch.tensor(np.ascontiguousarray(first.T), dtype=getattr(torch, dtype)).t()
        params = [torch.nn.Parameter(transposed),
                  torch.nn.Parameter(torch.tensor(second, dtype=getattr(torch, dtype)))]
        assert not params[0].is_contiguous()
        return params, adapters.Adam(params, lr=0.01, weight_decay=0.1, **options)

    def run(params, opt):
        for grads in problem.grads:
            for p, g in zip(params, grads):
                p.grad = torch.tensor(g, dtype=p.dtype)
            opt.step()
        return [[p.detach().double().numpy().copy() for p in params]]

    with _triton_kernel.interpreted_on_cpu():
        params, opt = make(fused=True)
        before = [p.detach().clone() for p in params]
        try:
            run(params, opt)
            message = ""
        except RuntimeError as error:
            message = str(error)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, params))
        got = run(*make())
    result = compared(got, run(*make()))  # outside: the CPU path
    result.update(refused="fused=True cannot step a parameter of shape (4, 6)" in message,
                  unchanged=unchanged)
    return result


JOBS = {"schedule": schedule_job, "fallback": fallback_job}


def main(jobs: list[str]) -> None:
    np.seterr(all="ignore")  # the interpreter computes masked-out lanes too
    torch.set_num_threads(1)
    _gpu_kernel.CHUNK, _triton_kernel.BLOCK = 32, 16
    report = {}
    for job in jobs:
        parts = job.split("|")
        try:
            report[job] = JOBS[parts[0]](parts[1]) if parts[0] in JOBS else case_job(*parts)
        except Exception:  # reported per job, for the test to show
            report[job] = {"equal": False, "max_diff": None, "error": traceback.format_exc()}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
