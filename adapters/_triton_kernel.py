"""Traced rules printed as Triton: the generated kernel of the torch optimizers on CUDA.

One ``@triton.jit`` kernel per rule, dtypes and static options steps all tensors of a
batch in one launch over the chunk table of :mod:`._gpu_kernel`: a program per chunk,
a tensor's values (the step's scalars, its statistic, its buffers of one value per
tensor) computed once per program, then the rule's elementwise operations over the
chunk in blocks of :data:`BLOCK` elements.  The tensors' data pointers are 64-bit
integers of the metadata, cast to typed pointers in the kernel, so that one kernel
takes any number of tensors without recompiling, and the same source runs compiled and
under Triton's interpreter (which reads memory at such addresses).

Exactness, operation by operation as the CPU kernel (each correctly rounded):

* float32 division and square root are ``tl.math.div_rn`` and ``tl.math.sqrt_rn``
  (Triton's ``/`` and ``tl.sqrt`` are approximate in float32 on NVIDIA GPUs);
  float64's ``/`` and ``tl.sqrt`` are IEEE operations already;
* the kernel is compiled with ``enable_fp_fusion=False``: ``a * b + c`` is not
  contracted into a fused multiply-add;
* weak Python numbers are double precision, read from the metadata as float64 bits
  (a Python float argument of a Triton kernel would be float32); constants are typed
  ``tl.full`` values, exact in their dtype;
* bfloat16 is read and written as its 16 bits, rounded to nearest even with NaN to
  0x7fc0 as PyTorch's CPU conversion does (the C kernel's rounding); float16 through
  Triton's conversion, which rounds to nearest even; a double reaches either through
  float32, as PyTorch converts.

The source is written to the kernel cache (:func:`._native.cache_dir`), named by its
hash, and imported from there: Triton compiles a kernel from its source file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from pathlib import Path

from mvn_core._rule import next_count

from . import _cpu_kernel, _elementwise, _gpu_kernel, _native
from ._elementwise import ARITHMETIC, BOOL, COMPARISONS, DOUBLE, LOGICAL, Constant, Trace

BLOCK = 1024  # elements per block of a program's loop over its chunk
WARPS = 4
OPTIONS = {"enable_fp_fusion": False}  # compile options: no contraction into FMAs
MODULE_PREFIX = "mvn_core_triton_"  # of the generated modules' names
# dtype name -> (Triton type of its values in a kernel, Triton type of its storage)
TYPES = {"float16": ("tl.float32", "tl.float16"), "bfloat16": ("tl.float32", "tl.uint16"),
         "float32": ("tl.float32", "tl.float32"), "float64": ("tl.float64", "tl.float64"),
         "bool": ("tl.int1", "tl.int1")}
HALF = ("float16", "bfloat16")
# Read by the tests only: under Triton's interpreter, CPU tensors run the Triton kernel.
_interpreted_cpu = False

PRELUDE = '''import triton
import triton.language as tl

INF = tl.constexpr(float("inf"))
NAN = tl.constexpr(float("nan"))


@triton.jit
def bf16_load(bits):
    return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def bf16_store(x):
    # to nearest, ties to even; NaN to the quiet NaN 0x7fc0, as PyTorch converts
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def round_bf16(x):
    return bf16_load(bf16_store(x))


@triton.jit
def round_f16(x):
    return x.to(tl.float16).to(tl.float32)
'''


def value_type(dtype: str) -> str:
    return TYPES[dtype][0]


def _constant(value, dtype: str) -> str:
    if dtype == BOOL:
        return f"tl.full([], {bool(value)}, tl.int1)"
    if math.isnan(value):
        code = "NAN"
    elif math.isinf(value):
        code = "INF" if value > 0 else "-INF"
    else:
        code = repr(float(value))  # the shortest repr reads back exactly
    return f"tl.full([], {code}, {value_type(dtype)})"


def _converted(code: str, source: str, target: str) -> str:
    """``code`` (a value of ``source``) as a value of ``target`` in Triton's types."""
    if value_type(source) == value_type(target):
        return code
    if target == BOOL:
        return f"({code} != 0)"
    return f"{code}.to({value_type(target)})"


def expression(node, name_of=lambda v: v.name) -> str:
    """The Triton expression of one operation."""
    def operand(a, as_dtype=None):
        code = _constant(a.value, a.dtype) if isinstance(a, Constant) else name_of(a)
        return code if as_dtype is None else _converted(code, a.dtype, as_dtype)

    op = node.op
    if op in ARITHMETIC or op in COMPARISONS:
        compute = node.dtype if op in ARITHMETIC else _elementwise.promote(
            *(a.dtype for a in node.args))
        a, b = (operand(x, compute) for x in node.args)
        if op == "div" and value_type(compute) == "tl.float32":
            code = f"tl.math.div_rn({a}, {b})"
        else:
            code = f"({a} {ARITHMETIC.get(op) or COMPARISONS[op]} {b})"
    elif op in LOGICAL:
        a, b = (operand(x) for x in node.args)
        code = f"({a} {'&' if op == 'and' else '|'} {b})"
    elif op == "neg":
        code = f"(-{operand(node.args[0])})"
    elif op == "not":
        code = f"(~{operand(node.args[0])})"
    elif op == "sqrt":
        x = operand(node.args[0], node.dtype)
        code = f"tl.math.sqrt_rn({x})" if value_type(node.dtype) == "tl.float32" else f"tl.sqrt({x})"
    elif op == "sign":  # as the C kernel's: +0 for either zero, NaN for NaN
        x = operand(node.args[0], node.dtype)
        one, zero = _constant(1.0, node.dtype), _constant(0.0, node.dtype)
        code = (f"tl.where({x} > {zero}, {one}, tl.where({x} < {zero}, -{one}, "
                f"tl.where({x} == {x}, {zero}, {x})))")
    elif op == "isfinite":
        (x,) = node.args
        code = f"(tl.abs({operand(x)}) < {_constant(math.inf, x.dtype)})"
    elif op == "where":
        condition, a, b = node.args
        code = f"tl.where({operand(condition)}, {operand(a, node.dtype)}, {operand(b, node.dtype)})"
    elif op == "cast":
        (x,) = node.args
        if node.dtype in HALF:  # from double through float, as PyTorch converts
            return _round(_converted(operand(x), x.dtype, "float32"), node.dtype)
        return _converted(operand(x), x.dtype, node.dtype)
    else:
        raise NotImplementedError(f"no Triton form for the operation {op!r}")
    if node.dtype == BOOL and node.uniform:
        return _scalar_boolean(code)
    # Arithmetic in a half format: computed in float32, then rounded (as the C kernel).
    return _round(code, node.dtype) if node.dtype in HALF and op not in COMPARISONS else code


def _scalar_boolean(code: str) -> str:
    # Triton's interpreter types a comparison of scalars as its operands' type, so that
    # broadcast against a block it would become a number: a select gives it int1.
    return f"tl.where({code}, True, False)"


def _round(code: str, dtype: str) -> str:
    return f"round_{'bf16' if dtype == 'bfloat16' else 'f16'}({code})"


def _load(dtype: str, code: str) -> str:
    if dtype == "bfloat16":
        return f"bf16_load({code})"
    return f"{code}.to(tl.float32)" if dtype == "float16" else code


def _store(dtype: str, code: str) -> str:
    if dtype == "bfloat16":
        return f"bf16_store({code})"
    return f"{code}.to({TYPES[dtype][1]})"


def triton_kernel(trace: Trace, name: str) -> _gpu_kernel.Kernel:
    """The multi-tensor Triton kernel ``name`` of ``trace``, with the arguments::

        NAME(meta, n_chunks, K, chunk, arrays, stats, old, BLOCK, ALIGNED)

    ``meta``: the metadata of :mod:`._gpu_kernel` (int64); ``arrays``, ``stats``,
    ``old``: its float64 arrays (any tensor where the rule reads none); ``ALIGNED``:
    every pointer is aligned to 16 bytes (the blocks are then read in vectors)."""
    by_name = {i.name: i for i in trace.inputs}
    where = _gpu_kernel.layout(trace)
    roles, dtype_of, tensor_buffers = where.roles, where.dtypes, where.tensor_buffers
    lines = [PRELUDE, "", "@triton.jit(do_not_specialize=['n_chunks', 'K'])",
             f"def {name}(meta, n_chunks, K, chunk, arrays, stats, old, BLOCK: tl.constexpr, "
             "ALIGNED: tl.constexpr):",
             "    c = tl.program_id(0)",
             "    k = tl.load(meta + 2 * c)",
             "    start = tl.load(meta + 2 * c + 1)",
             "    end = tl.minimum(start + chunk, tl.load(meta + 2 * n_chunks + k))",
             "    pointers = meta + 2 * n_chunks + K",
             f"    numbers = pointers + {len(roles)} * K"]
    for r, role in enumerate(roles):
        storage = TYPES[dtype_of[role]][1]
        lines.append(f"    P_{role} = tl.load(pointers + {r} * K + k).to(tl.pointer_type({storage}))")
    lines.append("    if ALIGNED:")
    lines += [f"        P_{role} = tl.multiple_of(P_{role}, 16)" for role in roles
              if role not in tensor_buffers]
    lines.append("        start = tl.multiple_of(start, BLOCK)")
    for j, scalar in enumerate(where.numbers):
        lines.append(f"    s_{scalar} = tl.load(numbers + {j}).to(tl.float64, bitcast=True)")
    for j, scalar in enumerate(where.arrays):
        dtype = by_name[f"s_{scalar}"].dtype
        value = _converted(f"tl.load(arrays + {j})", DOUBLE, dtype)
        lines.append(f"    s_{scalar} = {_scalar_boolean(value) if dtype == BOOL else value}")
    if trace.has_statistic:
        lines.append(f"    stat = {_converted('tl.load(stats + k)', DOUBLE, by_name['stat'].dtype)}")
    for j, role in enumerate(tensor_buffers):
        value = _converted(f"tl.load(old + {j} * K + k)", DOUBLE, dtype_of[role])
        lines.append(f"    {role} = {value}")
    lines += [f"    {n.name} = {expression(n)}" for n in trace.nodes if n.uniform]
    # Whole blocks unmasked (read in vectors where aligned), then the chunk's tail.
    lines.append("    full = start + (end - start) // BLOCK * BLOCK")
    for loop, mask in (("range(start, full, BLOCK)", "None"), ("range(full, end, BLOCK)", "i < end")):
        lines += [f"    for i0 in {loop}:", "        i = i0 + tl.arange(0, BLOCK)",
                  f"        mask = {mask}"]
        lines += _element_lines(trace, tensor_buffers)
    for out, value, dtype in trace.outputs:
        if out in tensor_buffers:
            lines.append(f"    tl.store(P_{out}, {_store(dtype, _code(value))}, mask=start == 0)")
    return _gpu_kernel.Kernel(name, "\n".join(lines) + "\n", trace)


def _element_lines(trace: Trace, tensor_buffers: tuple) -> list[str]:
    lines = [f"        {i.name} = {_load(i.dtype, f'tl.load(P_{i.name} + i, mask=mask)')}"
             for i in trace.inputs if i.kind == "element"]
    lines += [f"        {n.name} = {expression(n)}" for n in trace.nodes if not n.uniform]
    for out, value, dtype in trace.outputs:
        if out not in tensor_buffers:
            lines.append(f"        tl.store(P_{out} + i, {_store(dtype, _code(value))}, mask=mask)")
    return lines


def _code(value) -> str:
    return _constant(value.value, value.dtype) if isinstance(value, Constant) else value.name


# --- compiling and loading ------------------------------------------------------------

def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def steps_on(device) -> bool:
    """Whether the torch optimizers' kernel path steps tensors on ``device`` here: CUDA
    devices (and the CPU under :func:`interpreted_on_cpu`)."""
    return device.type == "cuda" or (device.type == "cpu" and _interpreted_cpu)


def unavailable_reason(device) -> str | None:
    """Why the Triton kernel cannot step tensors on ``device`` (one of :func:`steps_on`),
    or None."""
    if device.type == "cuda" and interpreting():
        return "Triton's interpreter (TRITON_INTERPRET=1) runs CPU tensors only"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    return None


@contextlib.contextmanager
def interpreted_on_cpu():
    """Meanwhile, the torch optimizers' kernel path runs CPU tensors through the Triton
    kernel, interpreted: for testing the kernels without a GPU."""
    global _interpreted_cpu
    if not interpreting():
        raise RuntimeError("the Triton kernel runs CPU tensors only under Triton's "
                           "interpreter: set TRITON_INTERPRET=1 before triton is imported")
    _interpreted_cpu = True
    try:
        yield
    finally:
        _interpreted_cpu = False


def _build(trace: Trace, name: str):
    kernel = triton_kernel(trace, name)
    try:
        return kernel, getattr(load(kernel.source), name)
    except ImportError as error:
        raise _native.KernelUnavailable(f"Triton cannot be imported: {error}") from error


KERNELS = _gpu_kernel.Kernels(_build)


def forget_compiled() -> None:
    """Forget the kernels loaded in this process (the disk caches stay), as a new
    process starts: for measuring first steps."""
    KERNELS.forget()
    for name in [n for n in sys.modules if n.startswith(MODULE_PREFIX)]:
        del sys.modules[name]


def load(source: str):
    """The module of ``source``, written to the kernel cache under its hash (once) and
    imported from there: Triton reads a kernel's source from its file."""
    key = hashlib.sha256(source.encode()).hexdigest()[:32]
    name = f"{MODULE_PREFIX}{key}"
    if name in sys.modules:
        return sys.modules[name]
    folder = _native.cache_dir()
    path = folder / f"{key}.py"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
            f.write(source)
        os.replace(f.name, path)  # processes sharing the cache never read half a file
    spec = importlib.util.spec_from_file_location(name, Path(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


# --- the torch optimizers' kernel path on CUDA --------------------------------------------

def torch_step(rule, params, grads, buffer_lists, count, hyper, statistics, strict, fallback):
    """The kernel path of :mod:`._torch_paths` for a batch on one CUDA device (or CPU
    tensors under :func:`interpreted_on_cpu`): one launch per batch of tensors that
    share their dtypes.  Tensors it does not take (not contiguous, or of other dtypes)
    run ``fallback`` (the multi-tensor path); with ``strict`` (``fused=True``) they are
    refused instead, before anything is written.  Array hyperparameters must be on the
    params' device."""
    import array_api_compat.torch as xp
    import torch

    tensor_rule = rule.tensor_rule
    hyper = tensor_rule.checked_hyperparameters(hyper)
    decays = tensor_rule.decays(hyper)
    new_count = next_count(xp, count)
    device = params[0].device
    element, _ = _cpu_kernel.split_buffers(tensor_rule, buffer_lists)
    reason = unavailable_reason(device)
    if reason is not None and device.type == "cuda":
        _cpu_kernel._warn_once(reason)

    def takes(i):
        return reason is None and all(t.is_contiguous() and t.device == device for t in
                                      (params[i], grads[i], *(c[i] for c in element)))

    launches, rest = _cpu_kernel.plan(xp, tensor_rule, params, grads, buffer_lists, new_count,
                                      hyper, decays, takes, build=KERNELS.buildable)
    if strict and rest:
        p = params[rest[0]]
        reason = reason or ("the Triton kernel takes contiguous float16, bfloat16, float32 "
                            "and float64 tensors")
        raise RuntimeError(f"fused=True cannot step a parameter of shape {tuple(p.shape)}, "
                           f"dtype {p.dtype} on {p.device}: {reason}; leave fused unset to "
                           "fall back to the multi-tensor path")

    def compiled_of(batch):
        return KERNELS.compiled(tensor_rule, _elementwise.describe(batch.step_scalars),
                                batch.names, decays)

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for fn, launch in _gpu_kernel.launches(xp, tensor_rule, launches, params, grads,
                                               buffer_lists, torch.Tensor.data_ptr,
                                               torch.Tensor.numel, compiled_of, statistics):
            _run(fn, launch, device)
    if rest:
        fallback(rule, [params[i] for i in rest], [grads[i] for i in rest],
                 [[buffer_list[i] for i in rest] for buffer_list in buffer_lists], count, hyper,
                 None if statistics is None else [statistics[i] for i in rest])
    return new_count, buffer_lists


def _run(fn, launch: _gpu_kernel.Launch, device) -> None:
    import torch

    if launch.n_chunks == 0:
        return
    meta = torch.from_numpy(launch.metadata).to(device, non_blocking=True)
    unused = meta  # an argument the kernel does not read
    fn[(launch.n_chunks,)](
        meta, launch.n_chunks, launch.n_tensors, _gpu_kernel.CHUNK,
        unused if launch.arrays is None else launch.arrays,
        unused if launch.stats is None else launch.stats,
        unused if launch.old is None else launch.old,
        BLOCK=BLOCK, ALIGNED=launch.aligned, num_warps=WARPS, **OPTIONS)
