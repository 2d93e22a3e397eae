"""Traced rules printed as C: the CPU's multi-tensor kernel (and, by
:func:`expression`, the operations of the CUDA kernel of :mod:`._cuda_source`).

The CPU kernel steps all tensors of a batch in one call.  Its arguments::

    void NAME(int64_t n_tensors, const int64_t *numel, void *const *ptrs,
              const double *scalars, const double *stats, int64_t chunk, int32_t threads)

``ptrs`` holds one pointer per role and tensor, role-major (``ptrs[r * n + k]``), in
the order of :attr:`CpuKernel.roles`: the parameter, the gradient, then each state
buffer (a buffer of one value per tensor points at that value), then the updates'
output when the kernel does not update the parameter in place.  ``scalars`` are the
step's scalars in the trace's order, each as a double (a float32 value is exact in
one); ``stats`` the rule's statistic per tensor (NULL for a rule without one).

The tensors are cut into chunks of ``chunk`` elements; one OpenMP loop runs over the
chunks of all tensors, and the loop over a chunk's elements is plain enough for the
compiler to vectorize.  The values of one tensor (its statistic, its buffers of one
value per tensor) are computed once per chunk, and those buffers written by the
tensor's first chunk from a copy of the old values taken before the loop, so that no
chunk reads a value another has written.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._elementwise import (
    ARITHMETIC,
    BOOL,
    COMPARISONS,
    DOUBLE,
    LOGICAL,
    Constant,
    Trace,
    literal_c,
)

# dtype name -> (C type of its values in a kernel, C type of its storage)
C_TYPES = {"float16": ("float", "_Float16"), "bfloat16": ("float", "uint16_t"),
           "float32": ("float", "float"), "float64": ("double", "double"),
           "bool": ("bool", "bool")}
HALF = ("float16", "bfloat16")

PRELUDE = r"""#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* bfloat16 is stored as the upper half of a float32; rounding to nearest, ties to
   even, and NaN to the quiet NaN 0x7fc0, as PyTorch converts. */
static inline float mvn_bf16_load(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t mvn_bf16_store(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float mvn_round_bf16(float f) { return mvn_bf16_load(mvn_bf16_store(f)); }
static inline float mvn_round_f16(float f) { return (float)(_Float16)f; }
"""


def value_type(dtype: str) -> str:
    return C_TYPES[dtype][0]


def expression(node, name_of=lambda v: v.name) -> str:
    """The C expression of one operation (``name_of`` maps an operand to its name)."""
    def operand(a):
        return literal_c(a.value, a.dtype) if isinstance(a, Constant) else name_of(a)

    args = [operand(a) for a in node.args]
    op = node.op
    if op in ARITHMETIC:
        code = f"({args[0]} {ARITHMETIC[op]} {args[1]})"
    elif op in COMPARISONS:
        code = f"({args[0]} {COMPARISONS[op]} {args[1]})"
    elif op in LOGICAL:
        code = f"({args[0]} {LOGICAL[op]} {args[1]})"
    elif op == "neg":
        code = f"(-{args[0]})"
    elif op == "not":
        code = f"(!{args[0]})"
    elif op == "sqrt":
        code = f"{'sqrt' if node.dtype == DOUBLE else 'sqrtf'}({args[0]})"
    elif op == "sign":  # the Array API's (and NumPy's): +0 for either zero, NaN for NaN
        x = args[0]
        code = f"({x} > 0 ? 1 : ({x} < 0 ? -1 : ({x} == {x} ? 0 : {x})))"
    elif op == "isfinite":
        code = f"isfinite({args[0]})"
    elif op == "where":
        code = f"({args[0]} ? {args[1]} : {args[2]})"
    elif op == "cast":
        return _cast(args[0], node.args[0].dtype, node.dtype)
    else:
        raise NotImplementedError(f"no C form for the operation {op!r}")
    # Arithmetic in a half format: computed in float32 (exact enough: float32 holds
    # more than twice their digits), then rounded, as one operation in that format.
    return _round(code, node.dtype) if node.dtype in HALF and op not in COMPARISONS else code


def _cast(code: str, source: str, target: str) -> str:
    if target == BOOL:
        return f"({code} != 0)"
    if target in HALF:
        # from double through float, as PyTorch converts (c10::BFloat16(float(x)))
        return _round(f"(float)({code})", target)
    return f"(({value_type(target)})({code}))"


def _round(code: str, dtype: str) -> str:
    return f"mvn_round_{'bf16' if dtype == 'bfloat16' else 'f16'}({code})"


def load(dtype: str, code: str) -> str:
    return f"mvn_bf16_load({code})" if dtype == "bfloat16" else f"({value_type(dtype)})({code})"


def store(dtype: str, code: str) -> str:
    if dtype == "bfloat16":
        return f"mvn_bf16_store({code})"
    return f"({C_TYPES[dtype][1]})({code})"


@dataclass(frozen=True)
class CpuKernel:
    """The C source of one traced step as a multi-tensor function, and its layout."""

    name: str
    source: str
    roles: tuple[str, ...]  # the order of the pointer table
    scalars: tuple[str, ...]  # the order of the scalars array
    has_statistic: bool


def cpu_kernel(trace: Trace, name: str) -> CpuKernel:
    """The multi-tensor CPU function ``name`` of ``trace``."""
    by_name = {i.name: i for i in trace.inputs}
    outputs = {out: (value, dtype) for out, value, dtype in trace.outputs}
    element_buffers = [f"b_{n}" for n in trace.buffer_names if n not in trace.tensor_buffers]
    tensor_buffers = [f"b_{n}" for n in trace.buffer_names if n in trace.tensor_buffers]
    roles = ["p", "g", *element_buffers, *tensor_buffers]
    in_place = "p" in outputs
    if not in_place:
        roles.append("update")
    # Without weight decay, a kernel writing the update does not read the parameter.
    role_dtype = {r: (by_name[r].dtype if r in by_name else outputs[r][1])
                  for r in roles if r != "p"}
    role_dtype["p"] = trace.dtypes["param"]

    lines = [PRELUDE, f"void {name}(int64_t n_tensors, const int64_t *numel, void *const *ptrs,",
             "        const double *scalars, const double *stats, int64_t chunk, int32_t threads)",
             "{", "    const int64_t K = n_tensors;"]
    for index, scalar in enumerate(trace.scalars):
        dtype = by_name[f"s_{scalar}"].dtype
        value = f"(scalars[{index}] != 0.0)" if dtype == BOOL else f"({value_type(dtype)})scalars[{index}]"
        lines.append(f"    const {value_type(dtype)} s_{scalar} = {value};")
    per_tensor_chunk = "1" if tensor_buffers else "0"  # an empty tensor still updates them
    lines += [
        "    int64_t n_chunks = 0;",
        "    for (int64_t k = 0; k < K; ++k)",
        f"        n_chunks += numel[k] > 0 ? (numel[k] + chunk - 1) / chunk : {per_tensor_chunk};",
        "    if (n_chunks == 0) return;",
        "    int64_t *table = (int64_t *)malloc(2 * n_chunks * sizeof(int64_t));",
        "    if (!table) abort();",
        "    for (int64_t k = 0, c = 0; k < K; ++k) {",
        f"        if (numel[k] == 0 && {per_tensor_chunk}) {{ table[2 * c] = k; table[2 * c + 1] = 0; ++c; }}",
        "        for (int64_t start = 0; start < numel[k]; start += chunk) {",
        "            table[2 * c] = k; table[2 * c + 1] = start; ++c;",
        "        }",
        "    }",
    ]
    if tensor_buffers:
        lines.append(f"    double *old = (double *)malloc({len(tensor_buffers)} * K * sizeof(double));")
        lines.append("    if (!old) abort();")
        for j, role in enumerate(tensor_buffers):
            r = roles.index(role)
            lines.append(f"    for (int64_t k = 0; k < K; ++k) old[{j} * K + k] = "
                         f"{load(role_dtype[role], f'*({C_TYPES[role_dtype[role]][1]} *)ptrs[{r} * K + k]')};")
    lines += [
        "    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)",
        "    for (int64_t c = 0; c < n_chunks; ++c) {",
        "        const int64_t k = table[2 * c], start = table[2 * c + 1];",
        "        const int64_t end = start + chunk < numel[k] ? start + chunk : numel[k];",
    ]
    for r, role in enumerate(roles):
        if role in tensor_buffers:
            continue
        storage = C_TYPES[role_dtype[role]][1]
        const = "const " if role == "g" or (role == "p" and not in_place) else ""
        lines.append(f"        {const}{storage} *restrict P_{role} = ({const}{storage} *)ptrs[{r} * K + k];")
    if trace.has_statistic:
        lines.append(f"        const {value_type(by_name['stat'].dtype)} stat = "
                     f"({value_type(by_name['stat'].dtype)})stats[k];")
    for j, role in enumerate(tensor_buffers):
        lines.append(f"        const {value_type(role_dtype[role])} {role} = "
                     f"({value_type(role_dtype[role])})old[{j} * K + k];")
    uniform = [n for n in trace.nodes if n.uniform]
    varying = [n for n in trace.nodes if not n.uniform]
    lines += [f"        const {value_type(n.dtype)} {n.name} = {expression(n)};" for n in uniform]
    lines.append("        for (int64_t i = start; i < end; ++i) {")
    lines += [f"            const {value_type(i.dtype)} {i.name} = {load(i.dtype, f'P_{i.name}[i]')};"
              for i in trace.inputs if i.kind == "element"]
    lines += [f"            const {value_type(n.dtype)} {n.name} = {expression(n)};" for n in varying]
    for out, value, dtype in trace.outputs:
        if out in tensor_buffers:
            continue
        target = "update" if out == "update" else out
        lines.append(f"            P_{target}[i] = {store(dtype, _code(value))};")
    lines.append("        }")
    if tensor_buffers:
        lines.append("        if (start == 0) {")
        for out, value, dtype in trace.outputs:
            if out in tensor_buffers:
                r = roles.index(out)
                lines.append(f"            *({C_TYPES[dtype][1]} *)ptrs[{r} * K + k] = "
                             f"{store(dtype, _code(value))};")
        lines.append("        }")
    lines.append("    }")
    if tensor_buffers:
        lines.append("    free(old);")
    lines += ["    free(table);", "}", ""]
    return CpuKernel(name, "\n".join(lines), tuple(roles), trace.scalars, trace.has_statistic)


def _code(value) -> str:
    return literal_c(value.value, value.dtype) if isinstance(value, Constant) else value.name

