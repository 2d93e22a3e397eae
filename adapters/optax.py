"""The rules as ``optax.GradientTransformation``s, generated from :data:`mvn_core.rules`.

Three forms, all made by one factory, :func:`_transformation`:

- an optimizer per rule (``mvn_grad``, ``maxva``, ``novograd``, ``adam``, ``adabelief``,
  ``laprop``, ``sgd``), whose updates include the learning rate, as ``optax.adam``;
- ``scale_by_<rule>``: the rule's direction with optax's sign convention, so that
  ``optax.chain(scale_by_adam(), optax.scale_by_learning_rate(lr))`` is ``adam(lr)``
  without weight decay (bit for bit for float32 and float64 params; for bfloat16 the
  direction is rounded to bfloat16 before the rate applies);
- ``gan``: a transformation of the gradients, to put in front of another one.

A transformation only moves data: ``update`` flattens the gradient pytree (``None``
leaves and ``optax.MaskedNode``s have no leaves), steps the flat list and rebuilds the
tree.  On a CPU the step is the rule's generated kernel (:mod:`._jax_kernel`): one XLA
custom call for the tensors that share their dtypes, which writes the state where it
lies when it is donated.  Its results are the rule's mathematics in IEEE arithmetic,
bit for bit, from the step's scalars as JAX computes them; the jitted pure rule differs
by a few ulps (XLA contracts ``a * b + c`` into fused multiply-adds, and divides by a
0-d array through its reciprocal).  Elsewhere (GPUs and TPUs, arrays sharded over
several devices, no C compiler, under ``jax.vmap`` and in derivatives) the step is the
pure rule's, the last after one warning.

The state is the rule's own NamedTuple (e.g. :class:`mvn_core.MVNState`): the count,
then each buffer field either as a pytree shaped like the params, as optax's own states
are (``state_layout="tree"``), or packed (``"packed"``): a
:class:`~._jax_kernel.Packed` of one flat array per dtype of the params, which spares
JAX the handling of one buffer per tensor and field at every call of a jitted step (at
a thousand tensors that costs more than the arithmetic).  By default ``init`` packs
where the kernel runs: in a process whose one JAX device is a CPU, with a C compiler;
sharded params (several devices) keep the tree, laid out as the params.  Both are
pytrees of arrays, so they work with ``jax.jit``, donation, ``optax.masked``,
``optax.MultiSteps`` and checkpoints; a packed field's ``.tree()`` gives its buffers
as a tree shaped like the params.  A checkpoint restores into a state of its own
layout: where the state is saved on one kind of machine and restored on another, name
the layout.
"""

from __future__ import annotations

import inspect
import textwrap
from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

import mvn_core
from mvn_core._rule import check_state_type

from . import _jax_kernel
from ._common import check_with_learning_rate

__all__ = ["transformation", "scale_by"]  # and, below, every registered rule's factories


def _transformation(rule: mvn_core.Rule, hyper: dict[str, Any], *, learning_rate: Any = None,
                    negate: bool = False, state_dtype: Any = None,
                    state_layout: str | None = None,
                    skip_nonfinite: bool = False) -> optax.GradientTransformationExtraArgs:
    """``rule`` as a transformation; ``learning_rate=None`` calls it without ``lr`` (GAN)."""
    fields = _per_tensor_fields(rule)
    step = rule.update if rule.tensor_rule is None else _kernel_or_pure(rule)
    if skip_nonfinite:
        step = mvn_core.skip_if_nonfinite(step, select_state=_tree_select)

    def init(params):
        leaves, treedef = jax.tree.flatten(params)
        state = _initial_state(rule, leaves, state_dtype)
        if _packs(rule, leaves, state_layout):
            return _packed(rule, state, leaves, treedef)
        return _as_trees(state, treedef, fields)

    def update(updates, state, params=None, **extra_args):
        # extra_args (e.g. value=loss, passed along an optax.chain) are not the rule's
        # business: ignored, as optax's own transformations ignore them.
        check_state_type(rule.name, rule.state_type, state)
        grads, treedef = jax.tree.flatten(updates)
        flat_params = None if params is None else _leaves_like(treedef, params, "params")
        rate = {} if learning_rate is None else {"lr": _rate_at(learning_rate, state.count)}
        out, new_state = step(_as_tuples(state, treedef, fields), grads, flat_params,
                              **rate, **hyper)
        if negate:  # exact: the rule's update at lr=1 is minus its direction
            out = [-u for u in out]
        return treedef.unflatten(out), _as_trees(new_state, treedef, fields)

    return optax.GradientTransformationExtraArgs(init, update)


def _tree_select(finite: Any, new: Any, old: Any) -> Any:
    """``new`` where ``finite``, else ``old``, leaf by leaf: a packed field is a pytree of
    its own, not the tuple of arrays the core selects among."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def _kernel_or_pure(rule: mvn_core.Rule) -> Callable:
    """``rule.update``, run as the generated kernel where it runs (see the module)."""

    def update(state, grads, params=None, **hyper):
        if _jax_kernel.runs(rule.tensor_rule, state, grads, params):
            return _jax_kernel.update(rule, state, grads, params, {**rule.defaults, **hyper})
        return rule.update(state, grads, params, **hyper)

    return update


LAYOUTS = (None, "tree", "packed")


def _packs(rule: mvn_core.Rule, leaves: list, state_layout: str | None) -> bool:
    """Whether ``init`` packs the state's buffers: where asked, and by default where the
    kernel runs, as far as can be known without the arrays' placement (which ``init``
    under ``jax.jit`` or ``jax.eval_shape`` does not see): in a process whose one JAX
    device is a CPU, for dtypes the kernel takes, with a C++ compiler."""
    if rule.tensor_rule is None or not leaves or state_layout == "tree":
        return False
    if state_layout == "packed":
        return True
    devices = jax.devices()
    return (len(devices) == 1 and devices[0].platform == "cpu"
            and _jax_kernel.takes_dtypes(leaves) and _jax_kernel.unavailable_reason() is None)


def _packed(rule: mvn_core.Rule, state: Any, leaves: list, treedef: Any) -> Any:
    groups = _jax_kernel.groups_of(leaves)
    scalar = rule.tensor_rule.scalar_buffers
    return state._replace(**{name: _jax_kernel.pack(getattr(state, name), treedef, groups,
                                                    name in scalar)
                             for name in _per_tensor_fields(rule)})


def _per_tensor_fields(rule: mvn_core.Rule) -> tuple[str, ...]:
    """The state fields holding one array per tensor.  GAN has none: its ``extra`` belongs
    to the scale strategy, whatever its shape."""
    return () if rule.tensor_rule is None else rule.tensor_rule.buffer_names


def _initial_state(rule: mvn_core.Rule, leaves: list, state_dtype: Any) -> Any:
    if leaves:
        return rule.init(leaves, state_dtype=state_dtype)
    # No leaves (optax.masked with everything masked out, a label of optax.multi_transform
    # that matches nothing): the core refuses empty params as a likely mistake, but optax
    # composes such transformations, so the state is the count alone.
    fields = _per_tensor_fields(rule)
    return rule.state_type(jnp.zeros((), jnp.int32), **{name: () for name in fields})


def _rate_at(learning_rate: Any, count: Any) -> Any:
    """A schedule is read at the count before the update: the first update uses
    ``schedule(0)``, as in optax."""
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _as_trees(state: Any, treedef: Any, fields: tuple[str, ...]) -> Any:
    """The rule's state with each per-tensor tuple rebuilt as a tree like the params
    (packed buffers stay packed)."""
    return state._replace(**{name: _tree_of(treedef, getattr(state, name)) for name in fields})


def _tree_of(treedef: Any, field: Any) -> Any:
    return field if isinstance(field, _jax_kernel.Packed) else treedef.unflatten(field)


def _as_tuples(state: Any, treedef: Any, fields: tuple[str, ...]) -> Any:
    """The inverse of :func:`_as_trees`: the per-tensor fields as the rule's flat tuples
    (packed buffers stay packed, once found to be the params')."""
    return state._replace(**{name: _tuple_of(treedef, getattr(state, name), f"state.{name}")
                             for name in fields})


def _tuple_of(treedef: Any, field: Any, label: str) -> Any:
    if not isinstance(field, _jax_kernel.Packed):
        return tuple(_leaves_like(treedef, field, label))
    if field.layout.treedef != treedef:
        raise ValueError(f"{label} is not a tree shaped like the updates: it is packed for "
                         f"params shaped {field.layout.treedef}, the updates are {treedef}")
    return field


def _leaves_like(treedef: Any, tree: Any, label: str) -> list:
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{label} is not a tree shaped like the updates ({error}): the "
                         "updates, the params and the state's buffers have the params' "
                         "structure") from None


# ---- the public factories: their signatures and documentation come from the rules

def transformation(rule: mvn_core.Rule | str) -> Callable[..., optax.GradientTransformation]:
    """The factory of ``rule``'s transformation (a :class:`mvn_core.Rule`, a user's made
    with :func:`mvn_core.define_rule`, or a registered rule's name): for an optimizer,
    called as ``optax.adam`` is (``learning_rate`` first, its updates include it); for
    a gradient transform (GAN), with its options."""
    rule = mvn_core.rules[rule] if isinstance(rule, str) else rule
    if rule.kind == "optimizer":
        return _optimizer(rule.function_name, rule)
    return _gradient_transform(rule)


def scale_by(rule: mvn_core.Rule | str) -> Callable[..., optax.GradientTransformation]:
    """The factory of ``scale_by_<rule>``: the rule's direction, without learning rate."""
    return _scale_by(mvn_core.rules[rule] if isinstance(rule, str) else rule)


def _optimizer(public_name: str, rule: mvn_core.Rule) -> Callable[..., optax.GradientTransformation]:
    defaults = {name: value for name, value in rule.defaults.items() if name != "lr"}

    def make(learning_rate, state_dtype, state_layout, skip_nonfinite, **hyper):
        _check(rule, hyper, learning_rate, state_layout)
        return _transformation(rule, hyper, learning_rate=learning_rate, state_dtype=state_dtype,
                               state_layout=state_layout,
                               skip_nonfinite=_flag("skip_nonfinite", skip_nonfinite))

    return _public(public_name, make, _signature(defaults, rule.defaults["lr"]),
                   _optimizer_doc(rule))


def _scale_by(rule: mvn_core.Rule) -> Callable[..., optax.GradientTransformation]:
    # NovoGrad's weight decay is part of its momentum, hence of its direction.
    dropped = {"lr"} if rule.tensor_rule.decay_inside else {
        "lr", "weight_decay", "coupled_weight_decay"}
    defaults = {name: value for name, value in rule.defaults.items() if name not in dropped}

    def make(state_dtype, state_layout, skip_nonfinite, **hyper):
        _check(rule, hyper, state_layout=state_layout)
        return _transformation(rule, hyper, learning_rate=1.0, negate=True,
                               state_dtype=state_dtype, state_layout=state_layout,
                               skip_nonfinite=_flag("skip_nonfinite", skip_nonfinite))

    return _public(f"scale_by_{rule.name}", make, _signature(defaults), _scale_by_doc(rule))


def _gradient_transform(rule: mvn_core.Rule) -> Callable[..., optax.GradientTransformation]:

    def make(skip_nonfinite, **options):
        _check(rule, options)
        return _transformation(rule, options,
                               skip_nonfinite=_flag("skip_nonfinite", skip_nonfinite))

    signature = inspect.Signature(
        [_parameter(name, value) for name, value in rule.defaults.items()]
        + [inspect.Parameter("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY, default=False)],
        return_annotation=optax.GradientTransformationExtraArgs)
    return _public(rule.name, make, signature, _transform_doc(rule))


def _check(rule: mvn_core.Rule, hyper: dict[str, Any], learning_rate: Any = None,
           state_layout: str | None = None) -> None:
    """Refuse bad hyperparameters when the transformation is made, not at its first step.

    Arrays (``optax.inject_hyperparams`` passes them, possibly traced) are checked for
    shape and dtype only, never read; a schedule is not checked.
    """
    if not (state_layout is None or isinstance(state_layout, str) and state_layout in LAYOUTS):
        raise ValueError(f"state_layout={state_layout!r}: it is None (chosen by init), "
                         "'tree' or 'packed'")
    check_with_learning_rate(rule, hyper, learning_rate)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} (under "
                        f"optax.inject_hyperparams, list it in static_args)")
    return value


def _signature(defaults: dict[str, Any], default_rate: Any = None) -> inspect.Signature:
    parameters = [] if default_rate is None else [_parameter("learning_rate", default_rate)]
    parameters += [_parameter(name, value) for name, value in defaults.items()]
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                   for name in ("state_dtype", "state_layout")]
    parameters += [inspect.Parameter("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY,
                                     default=False)]
    return inspect.Signature(parameters, return_annotation=optax.GradientTransformationExtraArgs)


def _parameter(name: str, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)


def _public(name: str, make: Callable, signature: inspect.Signature, doc: str) -> Callable:
    """A function called ``name`` with ``signature`` (what ``help``, ``inspect`` and
    ``optax.inject_hyperparams`` see) that calls ``make`` with every argument by name."""
    def factory(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return make(**bound.arguments)

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = __name__
    factory.__signature__ = signature
    factory.__doc__ = doc
    return factory


_STATE_DOC = """\
The state is :class:`mvn_core.{state}`: ``count``, then each buffer as a pytree
The state is :class:`mvn_core.{state}`: ``count``, then each buffer as a pytree
shaped like the params (``state_layout="tree"``) or packed in one flat array per
dtype (``"packed"``, the default where the generated kernel runs: one CPU device).
``state_dtype`` is the buffers' dtype; by default the params', except for float16
and bfloat16 params, whose state is float32.  Under ``optax.inject_hyperparams``,
name it (``"float32"``) or list it in ``static_args``: a dtype is callable, which
optax would take for a schedule; with bfloat16 params also pass
``hyperparam_dtype=jnp.float32``, or optax rounds ``b2=0.999`` to 1."""

_SKIP_DOC = """\
``skip_nonfinite=True`` skips every step whose gradients hold a NaN or an Inf
(:func:`mvn_core.skip_if_nonfinite`, under ``jax.jit`` too): the state is returned
as it was, its ``count`` included (which tells a skipped step), and the updates
are zeros.  By default non-finite gradients are computed as IEEE arithmetic
does (see the rule).  ``update`` takes and ignores extra keyword arguments
(``value=loss``), as optax's ``GradientTransformationExtraArgs`` do."""

_RULE_DOC = """\
{reference}.  The pure rule, :func:`mvn_core.{name}_update`:

{doc}"""


def _optimizer_doc(rule: mvn_core.Rule) -> str:
    return "\n\n".join([
        f"{rule.title} as an optax transformation; its updates include the learning rate.",
        "``learning_rate`` is a number, a 0-d array or an optax schedule, read at the step\n"
        "count before the update (the first update uses ``schedule(0)``).  The other\n"
        "hyperparameters go to the rule unchanged; numbers are checked here, arrays (as\n"
        "``optax.inject_hyperparams`` passes them) are not read, so changing them does not\n"
        "recompile.  ``update(updates, state, params)`` needs ``params`` for weight decay\n"
        "(an array ``weight_decay`` counts as weight decay even when it is zero).",
        _STATE_DOC.format(state=rule.state_type.__name__),
        _SKIP_DOC,
        _rule_doc(rule),
    ])


def _scale_by_doc(rule: mvn_core.Rule) -> str:
    inside = rule.tensor_rule.decay_inside
    decay = ("``weight_decay`` is kept: it is part of the momentum, hence of the\ndirection."
             if inside else
             "Weight decay is not part of it: chain ``optax.add_decayed_weights``.")
    return "\n\n".join([
        f"The direction of {rule.title}, with optax's sign convention (no learning rate).",
        f"``optax.chain(scale_by_{rule.name}(...), optax.scale_by_learning_rate(lr))``\n"
        f"makes the same steps as the optimizer with ``learning_rate=lr`` (bit for bit\n"
        f"for float32 and float64 params; in bfloat16 the direction is rounded first).\n{decay}",
        _STATE_DOC.format(state=rule.state_type.__name__),
        _SKIP_DOC,
        _rule_doc(rule),
    ])


def _transform_doc(rule: mvn_core.Rule) -> str:
    return "\n\n".join([
        f"{rule.title} as an optax transformation of the gradients (no learning rate),\n"
        "to put in front of an optimizer: ``optax.chain(gan(), sgd(0.1, momentum=0.9))``.",
        f"The state is :class:`mvn_core.{rule.state_type.__name__}` (the count, and what a\n"
        "custom ``scale`` keeps).  A callable ``scale`` must be listed in ``static_args``\n"
        "of ``optax.inject_hyperparams``, which would take it for a schedule.",
        _SKIP_DOC,
        _rule_doc(rule),
    ])


def _rule_doc(rule: mvn_core.Rule) -> str:
    return _RULE_DOC.format(reference=rule.reference, name=rule.name,
                            doc=textwrap.indent(rule.doc, "    "))


# Every registered rule's factories, by their public names: <function_name> (mvn_grad,
# adam, ..., gan) and, for an optimizer, scale_by_<name>.
FACTORIES: Mapping[str, Callable[..., optax.GradientTransformation]] = MappingProxyType({
    **{rule.function_name: transformation(rule) for rule in mvn_core.rules.values()},
    **{f"scale_by_{rule.name}": scale_by(rule) for rule in mvn_core.rules.values()
       if rule.kind == "optimizer"}})
globals().update(FACTORIES)
__all__ += ["FACTORIES", *FACTORIES]
