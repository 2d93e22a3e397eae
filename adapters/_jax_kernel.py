"""The generated CPU kernel under JAX: an XLA custom call (:mod:`jax.ffi`) that steps
all tensors of a batch in one call, their state updated in place.

The kernel is the multi-tensor C function of :mod:`._c_source`, printed from the rule's
own traced mathematics in its mode that writes the updates (an optax transformation
returns updates; ``optax.apply_updates`` adds them).  A handler of XLA's FFI, printed
here, wraps it: it gathers the buffers' addresses into the kernel's table (role-major),
turns the step's scalars into the doubles the kernel takes, and calls it.  Handler and
kernel are one C translation unit (the handler written against XLA's stable C
interface, ``xla/ffi/api/c_api.h``), compiled by :mod:`._native` (cached on disk like
every kernel) and registered with XLA once per process.

A step is one primitive, :data:`step_p`, whose operands are the gradients, the
parameters (with weight decay), the state buffers, the rule's statistic and the
step's scalars that are arrays; its results are the updates and the new buffers,
each buffer's result aliased to its operand, so that under ``jax.jit`` with donated
state the kernel writes the state where it lies.  How it compiles is decided when it
is lowered: the custom call for a computation on one CPU device, else (other
platforms, several devices, a kernel that cannot be built) the rule's pure
per-tensor mathematics (:meth:`TensorRule.step_tensor`), lowered in its place.  Under
``jax.vmap`` and in derivatives, the primitive is the pure mathematics too.

The scalars reach the kernel as the rule computes them (:meth:`TensorRule.scalars`,
with ``jax.numpy``, from the traced count): Python numbers, fixed when the step is
traced, as attributes of the call (doubles, exactly as the rule's weak scalars are);
arrays (a schedule's learning rate, ``optax.inject_hyperparams``, the step and the
bias corrections) as 0-d operands of their own dtype, so that a new value is a new
operand, never a new kernel.  The kernel equals the rule's mathematics in IEEE
arithmetic from those scalars (:func:`mvn_core.conformance.trajectories.ieee_trajectory`),
bit for bit.

The state may be *packed*: each buffer field of a group of tensors that share their
dtypes held in one flat array (:class:`Packed`), which saves JAX the handling of one
buffer per tensor and field at every call of a jitted step.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from mvn_core._rule import next_count

from . import _c_source, _cpu_kernel, _elementwise, _native

HANDLER = "mvn_core_ffi_step"  # the handler's symbol in every compiled library
# The most bytes of updates one launch writes.  The updates are temporaries of a jitted
# step, which XLA's CPU runtime allocates at every call; the C library serves a block
# above 32 MB with fresh pages from the system, whose first touch costs more than the
# arithmetic (10M float32 params: 74 ms a step instead of 28).  Launches of 16 MB,
# each one's updates added to the params before the next writes its own, keep the
# temporaries to one such block, which the library reuses from call to call.
LAUNCH_BYTES = 1 << 24


def unavailable_reason() -> str | None:
    """Why no kernel can be built here (said once in a warning too), or None."""
    return _cpu_kernel.unavailable_reason()


# ---- packed state ------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where each tensor's buffer lies in the arrays of a :class:`Packed` field:
    ``groups`` lists the tensors (indices in the params' leaves) of each array, in
    order; ``per_tensor`` buffers hold one value per tensor, the others one per
    element.  ``treedef`` is the params' structure."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[int, ...], ...]
    per_tensor: bool = False

    @functools.cached_property
    def slots(self) -> tuple[tuple[int, int, int], ...]:
        """Per tensor: its array, its first element there and its number of elements."""
        slots = [None] * len(self.shapes)
        for a, members in enumerate(self.groups):
            start = 0
            for i in members:
                size = 1 if self.per_tensor else int(np.prod(self.shapes[i], dtype=np.int64))
                slots[i] = (a, start, size)
                start += size
        return tuple(slots)


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class Packed:
    """One buffer field of a rule's state (e.g. ``m``), packed: one flat array per
    group of tensors that share their dtypes (``arrays``), laid out by ``layout``.

    A pytree whose leaves are those arrays, so that it is jitted, donated and
    checkpointed as any other; :meth:`tree` gives the buffers as a tree shaped like
    the params (slices of the arrays)."""

    arrays: tuple
    layout: Layout

    def tree_flatten(self):
        return self.arrays, self.layout

    @classmethod
    def tree_unflatten(cls, layout, arrays):
        return cls(tuple(arrays), layout)

    def buffers(self) -> list:
        """Each tensor's buffer, in the order of the params' leaves."""
        out = []
        for (a, start, size), shape in zip(self.layout.slots, self.layout.shapes):
            flat = self.arrays[a]
            out.append(flat[start] if self.layout.per_tensor else
                       jnp.reshape(flat[start:start + size], shape))
        return out

    def tree(self) -> Any:
        """The buffers as a tree shaped like the params."""
        return self.layout.treedef.unflatten(self.buffers())


def pack(buffers: tuple, treedef: Any, groups: tuple, per_tensor: bool) -> Packed:
    """Per-tensor buffers (one field of a state made by the rule's ``init``) packed."""
    layout = Layout(treedef, tuple(tuple(b.shape) for b in buffers), groups, per_tensor)
    arrays = tuple(jnp.concatenate([jnp.ravel(buffers[i]) for i in members])
                   for members in groups)
    return Packed(arrays, layout)


def groups_of(leaves: list) -> tuple[tuple[int, ...], ...]:
    """The tensors (indices) that share a packed array: those of one dtype."""
    groups: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault(jnp.dtype(leaf.dtype), []).append(i)
    return tuple(tuple(members) for members in groups.values())


# ---- one launch: its static description and its operands -----------------------------

@dataclass(frozen=True)
class Spec:
    """What a launch's kernel and operands depend on, beyond the operands' values
    (the primitive's parameters: hashable, so that equal launches share a kernel and
    a compilation).

    ``dtypes``: the kernel's dtype names (param, grad, state, state of one value per
    tensor); ``numbers``: the values of the step's scalars that are Python numbers, in
    their order in ``description`` (:func:`._elementwise.describe`); ``shapes``: the
    members' shapes; ``packed``: the state operands are packed arrays, where member
    ``k``'s buffer starts at ``offsets[k]`` (one value per element) or
    ``positions[k]`` (one per tensor)."""

    tensor_rule: Any
    description: tuple
    dtypes: tuple[str, ...]
    decays: bool
    numbers: tuple[float, ...]
    shapes: tuple[tuple[int, ...], ...]
    packed: bool
    offsets: tuple[int, ...]
    positions: tuple[int, ...]
    threads: int

    @property
    def roles(self) -> tuple[str, ...]:
        """The state buffers in the kernel's order: per element, then per tensor."""
        names = self.tensor_rule.buffer_names
        scalar = self.tensor_rule.scalar_buffers
        return (*(n for n in names if n not in scalar), *(n for n in names if n in scalar))

    @property
    def arrays(self) -> tuple[str, ...]:
        """The names of the step's scalars that are arrays (operands), in order."""
        return tuple(name for name, kind, _ in self.description if kind == "array")

    def counts(self) -> tuple[int, int, int, int]:
        """How many operands of each kind: parameters, per state buffer, statistic,
        scalars."""
        k = len(self.shapes)
        return (k if self.decays else 0, 1 if self.packed else k,
                int(self.tensor_rule.statistic is not None), len(self.arrays))


def _split(operands: tuple, spec: Spec):
    """The operands of a launch by kind: grads, params, state buffers (per role),
    statistics, the scalars that are arrays."""
    k = len(spec.shapes)
    n_params, per_buffer, n_stats, _ = spec.counts()
    grads, rest = list(operands[:k]), operands[k:]
    params, rest = list(rest[:n_params]), rest[n_params:]
    buffers = []
    for _ in spec.roles:
        buffers.append(list(rest[:per_buffer]))
        rest = rest[per_buffer:]
    stats, arrays = (rest[0] if n_stats else None), rest[n_stats:]
    return grads, params, buffers, stats, arrays


# ---- the primitive --------------------------------------------------------------------

step_p = Primitive("mvn_core_cpu_kernel")
step_p.multiple_results = True


@step_p.def_abstract_eval
def _abstract(*avals, spec: Spec):
    grads, _, buffers, _, _ = _split(avals, spec)
    updates = [g.update(dtype=jnp.dtype(spec.dtypes[0]), weak_type=False) for g in grads]
    return [*updates, *(a for role in buffers for a in role)]


@step_p.def_impl
def _eager(*operands, spec: Spec):
    return _jitted(spec)(*operands)


@functools.lru_cache(maxsize=None)
def _jitted(spec: Spec):
    return jax.jit(functools.partial(step_p.bind, spec=spec))


def _pure(*operands, spec: Spec) -> list:
    """The launch computed by the rule's pure per-tensor mathematics, in JAX: what the
    primitive is lowered to where the kernel does not run."""
    tensor_rule = spec.tensor_rule
    grads, params, buffers, stats, arrays = _split(operands, spec)
    step_scalars = _scalars(spec, arrays)
    buffer_lists = {name: _member_buffers(role, spec, name in tensor_rule.scalar_buffers)
               for name, role in zip(spec.roles, buffers)}
    updates, news = [], {name: [] for name in spec.roles}
    for k, g in enumerate(grads):
        old = tuple(buffer_lists[name][k] for name in tensor_rule.buffer_names)
        statistic = None if stats is None else stats[k]
        p = params[k] if spec.decays else None
        update, new = tensor_rule.step_tensor(jnp, step_scalars, g, p, old,
                                              jnp.dtype(spec.dtypes[0]), statistic)
        updates.append(update)
        for name, value in zip(tensor_rule.buffer_names, new):
            news[name].append(value)
    out = list(updates)
    for name, role in zip(spec.roles, buffers):
        out += _written_back(role, news[name], spec, name in tensor_rule.scalar_buffers)
    return out


def _scalars(spec: Spec, arrays) -> SimpleNamespace:
    """The step's scalars again, from the description, the numbers and the
    operands."""
    numbers, arrays, values = iter(spec.numbers), iter(arrays), {}
    for name, kind, value in spec.description:
        values[name] = value if kind == "flag" else next(numbers if kind == "number" else arrays)
    return SimpleNamespace(**values)


def _member_buffers(role: list, spec: Spec, per_tensor: bool) -> list:
    if not spec.packed:
        return role
    if per_tensor:
        return [role[0][i] for i in spec.positions]
    return [jnp.reshape(role[0][start:start + int(np.prod(shape, dtype=np.int64))], shape)
            for start, shape in zip(spec.offsets, spec.shapes)]


def _written_back(role: list, news: list, spec: Spec, per_tensor: bool) -> list:
    if not spec.packed:
        return news
    flat = role[0]
    for k, new in enumerate(news):
        start = spec.positions[k] if per_tensor else spec.offsets[k]
        flat = jax.lax.dynamic_update_slice(flat, jnp.reshape(new, (-1,)).astype(flat.dtype),
                                            (start,))
    return [flat]


def _lower_pure(ctx, *operands, spec: Spec):
    return mlir.lower_fun(functools.partial(_pure, spec=spec), multiple_results=True)(
        ctx, *operands)


def _lower_cpu(ctx, *operands, spec: Spec):
    # one device only: on several, the custom call would need every array whole
    if getattr(ctx.module_context.axis_context, "num_devices", None) != 1:
        return _lower_pure(ctx, *operands, spec=spec)
    try:
        target = _target(spec.tensor_rule, spec.description, spec.dtypes, spec.decays)
    except _native.KernelUnavailable as error:
        _cpu_kernel._warn_once(str(error))
        return _lower_pure(ctx, *operands, spec=spec)
    k = len(spec.shapes)
    n_params, per_buffer, _, _ = spec.counts()
    first = k + n_params  # operand index of the first state buffer
    aliases = {first + j: k + j for j in range(per_buffer * len(spec.roles))}
    lower = jax.ffi.ffi_lowering(target, operand_output_aliases=aliases)
    return lower(ctx, *operands, numbers=np.asarray(spec.numbers, np.float64),
                 offsets=np.asarray(spec.offsets or [0] * k, np.int64),
                 positions=np.asarray(spec.positions or [0] * k, np.int64),
                 packed=np.int64(spec.packed), threads=np.int64(spec.threads))


mlir.register_lowering(step_p, _lower_pure)
mlir.register_lowering(step_p, _lower_cpu, platform="cpu")


def _batched(operands, dims, *, spec: Spec):
    """Under ``jax.vmap``: the pure mathematics, mapped."""
    out = jax.vmap(functools.partial(_pure, spec=spec), in_axes=tuple(dims))(*operands)
    return out, [0] * len(out)


def _jvp(primals, tangents, *, spec: Spec):
    """In derivatives: those of the pure mathematics."""
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(functools.partial(_pure, spec=spec), list(primals), tangents)


batching.primitive_batchers[step_p] = _batched
ad.primitive_jvps[step_p] = _jvp


# ---- the handler: printed, compiled and registered once per kernel ---------------------

@functools.lru_cache(maxsize=None)
def _target(tensor_rule, description, dtypes, decays) -> str:
    """The name of the registered FFI target of this kernel, compiled now if need be."""
    kernel = _cpu_kernel.source(tensor_rule, description, dtypes, decays, in_place=False)
    source = handler_source(kernel, tensor_rule, description, dtypes, decays)
    library = _native.library(source, include_dirs=(jax.ffi.include_dir(),))
    name = f"mvn_core_{tensor_rule.name}_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, HANDLER)),
                                platform="cpu")
    return name


# The handler's side of XLA's FFI, in C against its stable C interface (a C++ handler
# through ``xla/ffi/api/ffi.h`` would take twenty times longer to compile): it answers
# XLA's query of its interface version, finds the attributes by name and reports
# errors through the API it is given.
HANDLER_PRELUDE = r"""
#include "xla/ffi/api/c_api.h"

static XLA_FFI_Error *mvn_core_ffi_error(const XLA_FFI_Api *api, const char *message) {
    XLA_FFI_Error_Create_Args args = {XLA_FFI_Error_Create_Args_STRUCT_SIZE, NULL, message,
                                      XLA_FFI_Error_Code_INVALID_ARGUMENT};
    return api->XLA_FFI_Error_Create(&args);
}

static XLA_FFI_Error *mvn_core_ffi_metadata(XLA_FFI_CallFrame *frame) {
    XLA_FFI_Metadata *metadata = ((XLA_FFI_Metadata_Extension *)frame->extension_start)->metadata;
    XLA_FFI_Api_Version version = {XLA_FFI_Api_Version_STRUCT_SIZE, NULL, XLA_FFI_API_MAJOR,
                                   XLA_FFI_API_MINOR};
    metadata->api_version = version;
    metadata->traits = 0;
    metadata->state_type_id.type_id = 0;
    return NULL;
}

/* The attribute called name, of the given type, or NULL. */
static const void *mvn_core_ffi_attr(const XLA_FFI_Attrs *attrs, const char *name,
                                     XLA_FFI_AttrType type) {
    for (int64_t i = 0; i < attrs->size; ++i) {
        const XLA_FFI_ByteSpan *n = attrs->names[i];
        if (attrs->types[i] == type && n->len == strlen(name) && memcmp(n->ptr, name, n->len) == 0)
            return attrs->attrs[i];
    }
    return NULL;
}

static int64_t mvn_core_ffi_numel(const XLA_FFI_Buffer *b) {
    int64_t n = 1;
    for (int64_t d = 0; d < b->rank; ++d) n *= b->dims[d];
    return n;
}
"""


def handler_source(kernel: _c_source.CpuKernel, tensor_rule, description: tuple,
                   dtypes: tuple, decays: bool) -> str:
    """One C translation unit: ``kernel`` and the FFI handler that calls it.

    The handler's operands are those of :func:`_split` (gradients; parameters with
    weight decay; each state buffer per tensor, or packed; the statistics; the scalars
    that are arrays), its results the updates and the state buffers, aliased to their
    operands.  Attributes: ``numbers``, the scalars that are Python numbers; ``packed``
    with each tensor's ``offsets`` and ``positions`` in packed buffers; ``threads``."""
    roles = kernel.roles
    buffer_roles = [r for r in roles if r.startswith("b_")]
    per_tensor = {f"b_{n}" for n in tensor_rule.scalar_buffers}
    storage = {role: dtypes[3] if role in per_tensor else dtypes[2] for role in buffer_roles}
    typed = {name: dtype for name, kind, dtype in description if kind == "array"}
    compute = typed["t"]

    def c_type(dtype):
        return _c_source.C_TYPES[dtype][1]

    n_args = ["K", *(["K"] if decays else []), *(["per_buffer"] * len(buffer_roles)),
              *(["1"] if kernel.has_statistic else []), str(len(typed))]
    lines = [
        f"/* mvn-core: the {tensor_rule.name} kernel and its XLA FFI handler (jaxlib "
        f"{jax.__version__}) */",
        kernel.source, HANDLER_PRELUDE,
        f"XLA_FFI_Error *{HANDLER}(XLA_FFI_CallFrame *frame) {{",
        "    if (frame->extension_start && frame->extension_start->type == XLA_FFI_Extension_Metadata)",
        "        return mvn_core_ffi_metadata(frame);",
        "    if (frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;",
        "    const XLA_FFI_Attrs *attrs = &frame->attrs;",
        "    const XLA_FFI_Array *offsets = mvn_core_ffi_attr(attrs, \"offsets\", XLA_FFI_AttrType_ARRAY);",
        "    const XLA_FFI_Array *positions = mvn_core_ffi_attr(attrs, \"positions\", XLA_FFI_AttrType_ARRAY);",
        "    const XLA_FFI_Array *numbers = mvn_core_ffi_attr(attrs, \"numbers\", XLA_FFI_AttrType_ARRAY);",
        "    const XLA_FFI_Scalar *packed_attr = mvn_core_ffi_attr(attrs, \"packed\", XLA_FFI_AttrType_SCALAR);",
        "    const XLA_FFI_Scalar *threads = mvn_core_ffi_attr(attrs, \"threads\", XLA_FFI_AttrType_SCALAR);",
        "    if (!offsets || !positions || !packed_attr || !threads)",
        "        return mvn_core_ffi_error(frame->api, \"mvn-core kernel: an attribute is missing\");",
        "    const int64_t K = (int64_t)offsets->size;",
        "    const int64_t packed = *(const int64_t *)packed_attr->value;",
        "    const int64_t per_buffer = packed ? 1 : K;",
        f"    if (frame->args.size != {' + '.join(n_args)} || "
        f"frame->rets.size != K + {len(buffer_roles)} * per_buffer || "
        f"(numbers ? (int64_t)numbers->size : 0) != {len(kernel.scalars) - len(typed)})",
        "        return mvn_core_ffi_error(frame->api, \"mvn-core kernel: operands do not match\");",
        "    void *const *args = frame->args.args, *const *rets = frame->rets.rets;",
        "    const int64_t *offset = (const int64_t *)offsets->data;",
        "    const int64_t *position = (const int64_t *)positions->data;",
        "    int64_t *numel = (int64_t *)malloc((K ? K : 1) * sizeof(int64_t));",
        f"    void **ptrs = (void **)calloc({len(roles)} * (K ? K : 1), sizeof(void *));",
        "    double *stats = (double *)malloc((K ? K : 1) * sizeof(double));",
        "    if (!numel || !ptrs || !stats) abort();",
        "    int64_t arg = 0;",
        "    for (int64_t k = 0; k < K; ++k, ++arg) {",
        "        const XLA_FFI_Buffer *b = (const XLA_FFI_Buffer *)args[arg];",
        "        numel[k] = mvn_core_ffi_numel(b);",
        f"        ptrs[{roles.index('g')} * K + k] = b->data;",
        "    }",
    ]
    if decays:
        lines += [
            "    for (int64_t k = 0; k < K; ++k, ++arg)",
            f"        ptrs[{roles.index('p')} * K + k] = ((const XLA_FFI_Buffer *)args[arg])->data;",
        ]
    lines += [
        "    for (int64_t k = 0; k < K; ++k)  /* the updates */",
        f"        ptrs[{roles.index('update')} * K + k] = ((const XLA_FFI_Buffer *)rets[k])->data;",
        "    int64_t ret = K;",
    ]
    for role in buffer_roles:  # written in place: the results, aliased to the operands
        start = "position" if role in per_tensor else "offset"
        ctype = c_type(storage[role])
        lines += [
            f"    for (int64_t k = 0; k < K; ++k) {{  /* {role} */",
            f"        {ctype} *base = ({ctype} *)((const XLA_FFI_Buffer *)rets[ret + (packed ? 0 : k)])->data;",
            f"        ptrs[{roles.index(role)} * K + k] = packed ? (void *)(base + {start}[k]) : (void *)base;",
            "    }",
            "    ret += per_buffer;",
            "    arg += per_buffer;",
        ]
    if kernel.has_statistic:
        ctype = c_type(compute)
        lines += [
            f"    {{ const {ctype} *values = (const {ctype} *)((const XLA_FFI_Buffer *)args[arg++])->data;",
            "      for (int64_t k = 0; k < K; ++k) stats[k] = (double)values[k]; }",
        ]
    lines.append(f"    double scalars[{max(1, len(kernel.scalars))}];")
    number = 0
    for index, name in enumerate(kernel.scalars):
        if name in typed:
            ctype = c_type(typed[name])
            lines.append(f"    scalars[{index}] = (double)*(const {ctype} *)"
                         "((const XLA_FFI_Buffer *)args[arg++])->data;")
        else:
            lines.append(f"    scalars[{index}] = ((const double *)numbers->data)[{number}];")
            number += 1
    lines += [
        f"    {kernel.name}(K, numel, ptrs, scalars, {'stats' if kernel.has_statistic else 'NULL'}, "
        f"{_cpu_kernel.CHUNK}, (int32_t)*(const int64_t *)threads->value);",
        "    free(numel); free(ptrs); free(stats);",
        "    return NULL;",
        "}",
        "",
    ]
    return "\n".join(lines)


# ---- a step ---------------------------------------------------------------------------

def runs(tensor_rule, state, grads: list, params: list | None) -> bool:
    """Whether a step goes through the kernel's primitive: always for a packed state
    (the primitive is also its pure path); for per-tensor buffers, where a kernel can
    be built and no array is known to lie elsewhere than on one CPU device (traced
    arrays are decided when lowered)."""
    if tensor_rule is None or not grads:
        return False
    fields = [getattr(state, name) for name in tensor_rule.buffer_names]
    if any(isinstance(field, Packed) for field in fields):
        return True
    arrays = [*grads, *(params or []), *(b for field in fields for b in field)]
    if not all(_on_one_cpu(a) for a in arrays):
        return False
    return takes_dtypes(arrays) and unavailable_reason() is None


def _on_one_cpu(a) -> bool:
    if isinstance(a, jax.core.Tracer) or not isinstance(a, jax.Array):
        return True
    devices = a.devices()
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def takes_dtypes(arrays) -> bool:
    """Whether the kernels take the dtypes of ``arrays``."""
    return _cpu_kernel.supports([_dtype_name(a.dtype) for a in arrays])


def _dtype_name(dtype) -> str:
    return str(jnp.dtype(dtype))


def update(rule, state, grads: list, params: list | None, hyper: dict) -> tuple[list, Any]:
    """One step of ``rule`` through the kernel's primitive: the updates (one per
    tensor) and the new state, its buffers per tensor (tuples) or :class:`Packed` as
    they came.  Everything the pure rule refuses is refused first."""
    tensor_rule = rule.tensor_rule
    buffers = _Buffers({name: getattr(state, name) for name in tensor_rule.buffer_names})
    hyper = tensor_rule.checked_hyperparameters(hyper)
    if buffers.layout is not None:
        _check_packed(tensor_rule, state, grads, params, hyper)
    else:
        call, hyper = tensor_rule.checked_call(state, grads, params, hyper)
        grads, params = call.grads, call.params
    decays = tensor_rule.decays(hyper)
    count = next_count(jnp, state.count)  # saturates, as the pure rule's
    launches = _launches(tensor_rule, grads, params, buffers)
    order = [i for members, _, _ in launches for i in members]
    statistics = dict(zip(order, tensor_rule.statistics(
        jnp, [(grads[i], dtype) for members, dtype, _ in launches for i in members])))
    updates: list = [None] * len(grads)
    scalars: dict = {}
    for members, dtype, kernel_dtypes in launches:
        if dtype not in scalars:
            scalars[dtype] = tensor_rule.scalars(jnp, count, dtype, hyper)
        step_scalars = scalars[dtype]
        spec = _spec(tensor_rule, step_scalars, kernel_dtypes, decays, grads, members,
                     buffers.layouts())
        operands = [grads[i] for i in members]
        operands += [params[i] for i in members] if decays else []
        for name in spec.roles:
            operands += buffers.take(name, members)
        if tensor_rule.statistic is not None:
            operands.append(jnp.stack([jnp.reshape(statistics[i], ()) for i in members]))
        operands += [getattr(step_scalars, name) for name in spec.arrays]
        results = step_p.bind(*operands, spec=spec)
        for i, u in zip(members, results[:len(members)]):
            updates[i] = u
        rest = results[len(members):]
        per_buffer = spec.counts()[1]
        for name in spec.roles:
            buffers.put(name, members, rest[:per_buffer])
            rest = rest[per_buffer:]
    return updates, rule.state_type(count, **buffers.fields())


class _Buffers:
    """The state's buffer fields as a step writes them, launch by launch: per tensor
    (tuples), or packed (a launch takes, and gives back, its group's arrays)."""

    def __init__(self, fields: dict):
        self._fields = fields
        first = next(iter(fields.values()))
        self.layout = first.layout if isinstance(first, Packed) else None
        self._arrays = {name: list(field.arrays if self.layout else field)
                        for name, field in fields.items()}

    def layouts(self) -> list | None:
        """The packed fields' layouts (None for per-tensor buffers)."""
        return None if self.layout is None else [f.layout for f in self._fields.values()]

    def dtype(self, name: str, i: int):
        """The dtype of tensor ``i``'s buffer ``name``."""
        arrays = self._arrays[name]
        return (arrays[self.layout.slots[i][0]] if self.layout else arrays[i]).dtype

    def group(self, i: int):
        """The packed array that holds tensor ``i``'s buffers (None: per tensor)."""
        return None if self.layout is None else self.layout.slots[i][0]

    def take(self, name: str, members: list) -> list:
        if self.layout is None:
            return [self._arrays[name][i] for i in members]
        return [self._arrays[name][self.group(members[0])]]

    def put(self, name: str, members: list, arrays) -> None:
        if self.layout is None:
            for i, a in zip(members, arrays):
                self._arrays[name][i] = a
        else:
            (self._arrays[name][self.group(members[0])],) = arrays

    def fields(self) -> dict:
        return {name: (Packed(tuple(arrays), self._fields[name].layout) if self.layout
                       else tuple(arrays)) for name, arrays in self._arrays.items()}


def _check_packed(tensor_rule, state, grads, params, hyper) -> None:
    """The pure rule's checks, with each packed buffer seen as an array of its own
    (abstract: nothing is sliced, and the checks trace no operation on the arrays)."""
    views = {name: tuple(jax.ShapeDtypeStruct(shape, getattr(state, name).arrays[a].dtype)
                         for (a, _, _), shape in zip(getattr(state, name).layout.slots,
                                                     _buffer_shapes(getattr(state, name))))
             for name in tensor_rule.buffer_names}

    def check(count, views, grads, params):
        tensor_rule.checked_call(state._replace(count=count, **views), grads, params, hyper)

    jax.eval_shape(check, state.count, views, grads, params)


def _buffer_shapes(field: Packed) -> list:
    return [() if field.layout.per_tensor else shape for shape in field.layout.shapes]


def _launches(tensor_rule, grads, params, buffers: _Buffers) -> list:
    """The launches of a step: the members (tensor indices), their compute dtype and the
    kernel's dtype names, per group of tensors that share every dtype (and, packed, an
    array)."""
    names = tensor_rule.buffer_names
    element = [n for n in names if n not in tensor_rule.scalar_buffers]
    per_tensor = [n for n in names if n in tensor_rule.scalar_buffers]
    groups: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        key = (g.dtype, None if params is None else params[i].dtype,
               *(buffers.dtype(n, i) for n in names), buffers.group(i))
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        first = members[0]
        g_dtype = grads[first].dtype
        p_dtype = None if params is None else params[first].dtype
        dtype = tensor_rule.compute_dtype(jnp, g_dtype, buffers.dtype(names[0], first),
                                          *([] if p_dtype is None else [p_dtype]))
        kernel = [p_dtype or g_dtype, g_dtype, buffers.dtype((element or per_tensor)[0], first)]
        kernel += [buffers.dtype(per_tensor[0], first)] if per_tensor else []
        kernel = tuple(_dtype_name(d) for d in kernel)
        limit = LAUNCH_BYTES // jnp.dtype(kernel[0]).itemsize
        out += [(part, dtype, kernel) for part in _parts(members, grads, limit)]
    return out


def _parts(members: list, grads: list, limit: int) -> list[list[int]]:
    """``members`` cut into runs of at most ``limit`` elements (or one larger tensor)."""
    parts, size = [[]], 0
    for i in members:
        n = int(np.prod(grads[i].shape, dtype=np.int64))
        if parts[-1] and size + n > limit:
            parts.append([])
            size = 0
        parts[-1].append(i)
        size += n
    return parts


def _spec(tensor_rule, step_scalars, dtypes, decays, grads, members, layouts) -> Spec:
    description = _elementwise.describe(step_scalars)
    numbers = tuple(float(getattr(step_scalars, name)) for name, kind, _ in description
                    if kind == "number")
    shapes = tuple(tuple(grads[i].shape) for i in members)
    offsets = positions = ()
    if layouts is not None:
        element = next((l for l in layouts if not l.per_tensor), None)
        per_tensor = next((l for l in layouts if l.per_tensor), None)
        offsets = tuple(element.slots[i][1] if element else 0 for i in members)
        positions = tuple(per_tensor.slots[i][1] if per_tensor else 0 for i in members)
    total = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes)
    return Spec(tensor_rule, description, dtypes, decays, numbers, shapes,
                layouts is not None, offsets, positions, _cpu_kernel.threads_for(total))
