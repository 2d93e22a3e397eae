"""Traced rules printed as CUDA C: the multi-tensor kernel of the CuPy optimizers.

One kernel steps all tensors of a batch over the chunk table of :mod:`._gpu_kernel`::

    extern "C" __global__ void NAME(const long long *meta, long long n_chunks,
                                    long long K, long long chunk, const double *arrays,
                                    const double *stats, const double *old)

one block per chunk, its threads striding over the chunk's elements; a tensor's values
(the step's scalars, its statistic, its buffers of one value per tensor) are computed
before the loop, and those buffers written by the tensor's first chunk.  Each
operation is printed by :func:`._c_source.expression`, the CPU kernel's printer.

Exactness: compiled with :data:`OPTIONS` (NVRTC's and nvcc's defaults for division and
square root, made explicit, and no contraction into fused multiply-adds), each
operation rounds to nearest as in IEEE arithmetic.  Half formats are read and written
by their bits, in functions that are the same code on the device and on a host (the
tests compile the kernel as host code too): bfloat16 as the CPU kernel rounds it,
float16 to nearest even with NaN kept NaN.  The source needs no header (NVRTC, which
CuPy compiles with, has none by default): ``isfinite`` and the constants ``INFINITY``
and ``NAN`` are defined by their bits.
"""

from __future__ import annotations


from . import _gpu_kernel
from ._c_source import _code, expression, value_type
from ._elementwise import BOOL, Trace

# NVRTC's and nvcc's options (their defaults but --fmad): IEEE division and square
# root, subnormals kept, no fused multiply-add; C++17 for hexadecimal float literals.
OPTIONS = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false", "--std=c++17")
THREADS = 256  # per block
# dtype name -> C type of its storage (values are float, double or bool: value_type)
STORAGE = {"float16": "unsigned short", "bfloat16": "unsigned short", "float32": "float",
           "float64": "double", "bool": "bool"}

PRELUDE = r"""#ifndef MVN_FN  /* device code; a host compiler gets these defined before */
#define MVN_FN static __device__ __forceinline__
#define MVN_BITS(f) __float_as_uint(f)
#define MVN_FLOAT(u) __uint_as_float(u)
#define MVN_DOUBLE(b) __longlong_as_double(b)
#define MVN_DOUBLE_BITS(d) __double_as_longlong(d)
#endif
#ifndef INFINITY
#define INFINITY MVN_FLOAT(0x7f800000u)
#endif
#ifndef NAN
#define NAN MVN_FLOAT(0x7fc00000u)
#endif

/* By the bits: NVRTC need not declare isfinite without a header. */
MVN_FN bool mvn_isfinite(float x) { return (MVN_BITS(x) & 0x7f800000u) != 0x7f800000u; }
MVN_FN bool mvn_isfinite(double x) {
    const unsigned long long exponent = 0x7ff0000000000000ull;
    return ((unsigned long long)MVN_DOUBLE_BITS(x) & exponent) != exponent;
}

/* bfloat16: the upper half of a float32, rounded to nearest even, NaN to 0x7fc0. */
MVN_FN float mvn_bf16_load(unsigned short h) { return MVN_FLOAT((unsigned int)h << 16); }
MVN_FN unsigned short mvn_bf16_store(float f) {
    unsigned int u = MVN_BITS(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
MVN_FN float mvn_round_bf16(float f) { return mvn_bf16_load(mvn_bf16_store(f)); }

/* float16: exact to float32; from float32 to nearest, ties to even. */
MVN_FN float mvn_f16_load(unsigned short h) {
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return MVN_FLOAT(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {  /* subnormal: mantissa * 2^-24, exact */
        float value = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -value : value;
    }
    return MVN_FLOAT(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}
MVN_FN unsigned short mvn_f16_store(float f) {
    unsigned int u = MVN_BITS(f);
    unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);  /* NaN */
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  /* from 65520: infinity */
    if (a >= 0x38800000u) {  /* a normal float16: rebias, round at bit 13 */
        unsigned int r = a - 0x38000000u;
        return sign | (unsigned short)((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
    }
    unsigned int exponent = a >> 23;
    if (exponent < 102u) return sign;  /* below half the least subnormal: zero */
    unsigned int mantissa = (a & 0x7fffffu) | 0x800000u, shift = 126u - exponent;
    unsigned int q = mantissa >> shift, rest = mantissa & ((1u << shift) - 1u);
    unsigned int half = 1u << (shift - 1u);
    return sign | (unsigned short)(q + (rest > half || (rest == half && (q & 1u))));
}
MVN_FN float mvn_round_f16(float f) { return mvn_f16_load(mvn_f16_store(f)); }
"""


def _load(dtype: str, code: str) -> str:
    if dtype in ("float16", "bfloat16"):
        return f"mvn_{'bf16' if dtype == 'bfloat16' else 'f16'}_load({code})"
    return code


def _store(dtype: str, code: str) -> str:
    if dtype in ("float16", "bfloat16"):
        return f"mvn_{'bf16' if dtype == 'bfloat16' else 'f16'}_store({code})"
    return f"({STORAGE[dtype]})({code})"


def _expression(node) -> str:
    """The CPU kernel's C expression of an operation, but ``isfinite`` (a function of
    the C library) by its bits."""
    if node.op == "isfinite":
        return f"mvn_isfinite({_code(node.args[0])})"
    return expression(node)


def _from_double(code: str, dtype: str) -> str:
    return f"({code} != 0.0)" if dtype == BOOL else f"({value_type(dtype)})({code})"


def cuda_kernel(trace: Trace, name: str) -> _gpu_kernel.Kernel:
    """The multi-tensor CUDA kernel ``name`` of ``trace`` (arguments above: the
    metadata of :mod:`._gpu_kernel` and its float64 arrays, any pointer where the rule
    reads none)."""
    by_name = {i.name: i for i in trace.inputs}
    outputs = {out for out, _, _ in trace.outputs}
    where = _gpu_kernel.layout(trace)
    roles, dtype_of, tensor_buffers = where.roles, where.dtypes, where.tensor_buffers
    lines = [PRELUDE,
             f'extern "C" __global__ void {name}(const long long *meta, long long n_chunks,',
             "        long long K, long long chunk, const double *arrays, const double *stats,",
             "        const double *old)",
             "{",
             "    const long long c = blockIdx.x;",
             "    const long long k = meta[2 * c], start = meta[2 * c + 1];",
             "    const long long numel = meta[2 * n_chunks + k];",
             "    const long long end = start + chunk < numel ? start + chunk : numel;",
             "    const long long *pointers = meta + 2 * n_chunks + K;",
             f"    const long long *numbers = pointers + {len(roles)} * K;"]
    for r, role in enumerate(roles):
        storage = STORAGE[dtype_of[role]]
        const = "const " if role == "g" or role not in outputs else ""
        lines.append(f"    {const}{storage} *P_{role} = ({const}{storage} *)pointers[{r} * K + k];")
    for j, scalar in enumerate(where.numbers):
        lines.append(f"    const double s_{scalar} = MVN_DOUBLE(numbers[{j}]);")
    for j, scalar in enumerate(where.arrays):
        dtype = by_name[f"s_{scalar}"].dtype
        value = _from_double(f"arrays[{j}]", dtype)
        lines.append(f"    const {value_type(dtype)} s_{scalar} = {value};")
    if trace.has_statistic:
        dtype = by_name["stat"].dtype
        lines.append(f"    const {value_type(dtype)} stat = {_from_double('stats[k]', dtype)};")
    for j, role in enumerate(tensor_buffers):
        dtype = dtype_of[role]
        value = _from_double(f"old[{j} * K + k]", dtype)
        lines.append(f"    const {value_type(dtype)} {role} = {value};")
    lines += [f"    const {value_type(n.dtype)} {n.name} = {_expression(n)};"
              for n in trace.nodes if n.uniform]
    lines.append("    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {")
    lines += [f"        const {value_type(i.dtype)} {i.name} = {_load(i.dtype, f'P_{i.name}[i]')};"
              for i in trace.inputs if i.kind == "element"]
    lines += [f"        const {value_type(n.dtype)} {n.name} = {_expression(n)};"
              for n in trace.nodes if not n.uniform]
    for out, value, dtype in trace.outputs:
        if out not in tensor_buffers:
            lines.append(f"        P_{out}[i] = {_store(dtype, _code(value))};")
    lines.append("    }")
    if tensor_buffers:
        lines.append("    if (start == 0 && threadIdx.x == 0) {")
        for out, value, dtype in trace.outputs:
            if out in tensor_buffers:
                lines.append(f"        *P_{out} = {_store(dtype, _code(value))};")
        lines.append("    }")
    lines += ["}", ""]
    return _gpu_kernel.Kernel(name, "\n".join(lines), trace)

