"""Declaring a rule: :func:`define_rule` turns one declaration into everything else.

A rule is its per-tensor mathematics (a *direction* function), its state buffers, the
per-step constants it needs (bias corrections), its hyperparameters with their
defaults and ranges, and a few facts about it.  :func:`define_rule` makes from them
the pure functions ``init``/``update`` (with the documented signature and checks), the
state type (a NamedTuple: a JAX pytree as is), and a :class:`Rule` record.  The
adapters build their optimizers from a record (``optimizer_class(rule)``,
``transformation(rule)``), the generated kernels trace its direction, and the
conformance suite reads its settings; the built-in rules are declared the same way::

    import mvn_core
    from mvn_core import Hyperparameter as H

    def direction(xp, g, p, buffers, step):          # one tensor; step: the step's scalars
        (m,) = buffers
        m = step.b1 * m + (1 - step.b1) * g
        return m * step.inv_bc1, (m,)                 # update = -lr * direction

    def constants(xp, step):                          # per step, from step.t (the count)
        return {"inv_bc1": 1 / mvn_core.one_minus_power(xp, step.b1, step.t)}

    MOMENTUM = mvn_core.define_rule(
        "momentum", title="Bias-corrected momentum", direction=direction,
        constants=constants, buffers=("m",),
        hyperparameters={"lr": H(1e-2), "b1": H(0.9, "unit"), "weight_decay": H(0.0)},
        reference="(an example)", doc="m_t = b1 m + (1 - b1) g; update = -lr m_t / (1 - b1^t)")

``direction(xp, g, p, buffers, step) -> (d, new_buffers)`` computes in the tensor's
compute dtype: ``g`` the gradient, ``p`` the parameter when weight decay is on (else
None), ``buffers`` the old state buffers, ``step`` the hyperparameters (cast to the
compute dtype; Python numbers stay numbers), the step ``step.t`` and what ``constants``
adds.  The update is ``-lr * d``, plus decoupled weight decay (``-lr * weight_decay *
theta``) unless the rule declares ``coupled_weight_decay`` (then ``g += weight_decay *
theta`` when it is on) or ``decay="inside"`` (its direction uses ``p`` itself).  It
must use only the Array API on ``xp`` and never branch on array values, so that it
runs unchanged on every library, under ``jax.jit``, on lists of tensors and traced
into kernels.
"""

from __future__ import annotations

import inspect
import keyword
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

from ._inputs import RANGES
from ._rule import TensorRule


@dataclass(frozen=True)
class Hyperparameter:
    """A hyperparameter of a rule: its default, and the range a value given as a Python
    number must lie in (a key of :data:`RANGES`: ``"unit"`` [0, 1), ``"non_negative"``,
    ``"eps"`` (at least 2**-64), ``"flag"`` (True or False))."""

    default: Any
    range: str = "non_negative"

    def __post_init__(self) -> None:
        if self.range not in RANGES:
            raise ValueError(f"unknown range {self.range!r}; known: {', '.join(RANGES)}")


@dataclass(frozen=True)
class Rule:
    """One rule: its functions, state type, hyperparameters and documentation.

    ``kind`` is ``"optimizer"`` for a rule whose update returns parameter updates and
    ``"transform"`` for one that returns transformed gradients (GAN).  ``per_coordinate``
    says whether each coordinate's step depends on that coordinate alone (so that a
    rule may run on any slice of a tensor, e.g. one shard); ``tensor_rule`` holds the
    per-tensor mathematics that fast paths execute (None for a transform).
    ``betas`` names the pair of hyperparameters that PyTorch and Keras take as
    ``betas``; ``function_name`` the name of the functional adapters' (optax)
    optimizer; ``settings`` the settings the conformance suite checks besides the
    defaults; ``memories`` the averaging factors of the buffers its direction depends
    on (for the rounding model of :mod:`mvn_core.conformance.tolerance`); ``order``
    the rule's place in tables.
    """

    name: str
    title: str
    class_name: str
    init: Callable
    update: Callable
    state_type: type
    kind: str
    per_coordinate: bool
    reference: str
    tensor_rule: TensorRule | None
    hyperparameters: Mapping[str, Hyperparameter]
    check: Callable[[dict], None] | None = None  # relations between hyperparameters
    betas: tuple[str, ...] = ()
    function_name: str = ""
    settings: tuple[Mapping[str, Any], ...] = ()
    memories: tuple[str, ...] = ()
    order: int = 100
    defaults: Mapping[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        defaults = {name: h.default for name, h in self.hyperparameters.items()}
        object.__setattr__(self, "defaults", MappingProxyType(defaults))
        object.__setattr__(self, "function_name", self.function_name or self.name)

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.update) or ""

    def check_hyperparameters(self, **hyper: Any) -> None:
        """Raise the ``TypeError``/``ValueError`` that an update with ``hyper`` would raise,
        without arrays: adapters call it when a value is set, not only at the next step."""
        unknown = sorted(set(hyper) - set(self.defaults))
        if unknown:
            raise TypeError(f"{self.name} has no hyperparameter {', '.join(map(repr, unknown))}; "
                            f"it takes {', '.join(self.defaults)}")
        full = {**self.defaults, **hyper}
        if self.tensor_rule is not None:
            self.tensor_rule.checked_hyperparameters(full)
        elif self.check is not None:
            self.check(full)


def define_rule(name: str, *, title: str, direction: Callable, buffers: tuple[str, ...],
                hyperparameters: Mapping[str, Hyperparameter], reference: str, doc: str,
                constants: Callable[[Any, Any], dict] | None = None,
                statistic: Callable | None = None, tensor_buffers: tuple[str, ...] = (),
                decay: str = "decoupled", check: Callable[[dict], None] | None = None,
                class_name: str | None = None, betas: tuple[str, ...] = (),
                function_name: str | None = None, settings: tuple[Mapping, ...] = (),
                memories: tuple[str, ...] = (), order: int = 100,
                state_name: str | None = None, module: str | None = None) -> Rule:
    """Declare a rule; returns its :class:`Rule`, whose ``init``/``update`` are the pure
    functions ``<name>_init(params, *, state_dtype=None)`` and ``<name>_update(state,
    grads, params=None, **hyperparameters)``.

    ``buffers`` names the state buffers (shaped like each parameter; those listed in
    ``tensor_buffers`` hold one value per tensor instead).  ``hyperparameters`` maps
    each name to a :class:`Hyperparameter`; ``lr`` is required, ``weight_decay`` and
    ``coupled_weight_decay`` (a flag) have the meaning the module's docstring gives.
    ``constants(xp, step)`` returns the step's scalars computed from ``step`` (e.g. bias
    corrections from ``step.t``); ``statistic(xp, g)``, a per-tensor reduction (NovoGrad's
    squared norm) that ``direction`` then takes as a sixth argument; ``decay="inside"``
    when the direction applies weight decay itself; ``check(hyper)`` refuses
    combinations of values (it sees Python numbers and arrays: read only numbers).
    ``doc`` states the mathematics (the update's docstring).  The state type is called
    ``state_name`` (default ``<class_name>State``) and belongs to ``module`` (by
    default the caller's), where it is also set under that name unless the name is
    taken, so that states pickle.  The other arguments fill in the :class:`Rule` record.
    """
    module = module or sys._getframe(1).f_globals.get("__name__", __name__)
    class_name = class_name or title.replace(" ", "").replace("-", "")
    hyperparameters = MappingProxyType(dict(hyperparameters))
    _check_declaration(name, direction, buffers, hyperparameters, statistic, tensor_buffers,
                       decay, betas, settings, memories)
    state_type = _state_type(state_name or f"{class_name}State", title, buffers, tensor_buffers,
                             module)
    tensor_rule = TensorRule(
        name, state_type, direction, constants or _no_constants,
        scalar_buffers=frozenset(tensor_buffers), decay_inside=decay == "inside", check=check,
        statistic=statistic, ranges={n: h.range for n, h in hyperparameters.items()})
    return Rule(
        name=name, title=title, class_name=class_name, init=_init(name, tensor_rule, module),
        update=_update(name, tensor_rule, hyperparameters, doc, module), state_type=state_type,
        kind="optimizer", per_coordinate=statistic is None and not tensor_buffers,
        reference=reference, tensor_rule=tensor_rule, hyperparameters=hyperparameters,
        check=check, betas=tuple(betas), function_name=function_name or name,
        settings=tuple(MappingProxyType(dict(s)) for s in settings), memories=tuple(memories),
        order=order)


def _no_constants(xp: Any, step: Any) -> dict:
    return {}


def _check_declaration(name, direction, buffers, hyperparameters, statistic, tensor_buffers,
                       decay, betas, settings, memories) -> None:
    """Refuse a declaration that could only fail later (in an adapter, a kernel, a
    check), naming what is wrong."""
    where = f"define_rule({name!r})"
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"{where}: the name must be an identifier (it names the functions "
                         f"{name}_init and {name}_update)")
    if not buffers or any(not b.isidentifier() or b == "count" for b in buffers):
        raise ValueError(f"{where}: buffers must be identifiers other than 'count', at least "
                         f"one: got {buffers!r}")
    if len(set(buffers)) != len(buffers) or not set(tensor_buffers) <= set(buffers):
        raise ValueError(f"{where}: buffers must be distinct, and tensor_buffers among them")
    for key, h in hyperparameters.items():
        if not isinstance(h, Hyperparameter):
            raise TypeError(f"{where}: hyperparameter {key!r} must be a Hyperparameter, got "
                            f"{type(h).__name__}")
    if "lr" not in hyperparameters:
        raise ValueError(f"{where}: an optimizer takes a learning rate, 'lr'")
    flags = {"coupled_weight_decay": "flag"}
    for key, kind in flags.items():
        if key in hyperparameters and hyperparameters[key].range != kind:
            raise ValueError(f"{where}: {key} must be a flag")
    if decay not in ("decoupled", "inside"):
        raise ValueError(f"{where}: decay must be 'decoupled' or 'inside', got {decay!r}")
    arguments = 6 if statistic is not None else 5
    try:
        count = len(inspect.signature(direction).parameters)
    except (TypeError, ValueError):
        count = arguments
    if count != arguments:
        raise TypeError(f"{where}: direction takes {arguments} arguments (xp, g, p, buffers, "
                        f"step{', statistic' if statistic is not None else ''}), this one {count}")
    for label, names in (("betas", betas), ("memories", memories)):
        unknown = [n for n in names if n not in hyperparameters]
        if unknown:
            raise ValueError(f"{where}: {label} names {unknown}, which are not hyperparameters")
    for setting in settings:
        unknown = sorted(set(setting) - set(hyperparameters))
        if unknown:
            raise ValueError(f"{where}: a setting names {unknown}, which are not hyperparameters")


def _state_type(type_name: str, title: str, buffers, tensor_buffers, module: str) -> type:
    state_type = NamedTuple(type_name, [("count", Any), *((b, tuple) for b in buffers)])
    state_type.__module__ = module
    per_tensor = [b for b in buffers if b in tensor_buffers]
    state_type.__doc__ = (
        f"{title}'s state: the step count and, per tensor, the buffers "
        f"{', '.join(f'``{b}``' for b in buffers)}"
        + (f" ({', '.join(per_tensor)}: one value per tensor)" if per_tensor else "") + ".")
    namespace = vars(sys.modules[module]) if module in sys.modules else {}
    namespace.setdefault(type_name, state_type)
    return state_type


def _init(name: str, tensor_rule: TensorRule, module: str) -> Callable:
    def init(params: Any, *, state_dtype: Any = None) -> Any:
        return tensor_rule.init(params, state_dtype)

    init.__name__ = init.__qualname__ = f"{name}_init"
    init.__module__ = module
    init.__doc__ = (f"Zero state for :func:`{name}_update`: the count 0 and each buffer shaped "
                    "like its parameter.\n\n``state_dtype`` (a dtype or its name) stores the "
                    "buffers in another dtype; by default they take the params' dtype, and "
                    "float32 for float16 and bfloat16 params.")
    return init


def _update(name: str, tensor_rule: TensorRule, hyperparameters: Mapping, doc: str,
            module: str) -> Callable:
    defaults = {key: h.default for key, h in hyperparameters.items()}

    def update(state: Any, grads: Any, params: Any = None, **hyper: Any) -> tuple:
        unknown = [key for key in hyper if key not in defaults]
        if unknown:
            raise TypeError(f"{name}_update() got an unexpected keyword argument {unknown[0]!r}; "
                            f"it takes {', '.join(defaults)}")
        return tensor_rule.update(state, grads, params, {**defaults, **hyper})

    P = inspect.Parameter
    update.__signature__ = inspect.Signature(
        [P("state", P.POSITIONAL_OR_KEYWORD), P("grads", P.POSITIONAL_OR_KEYWORD),
         P("params", P.POSITIONAL_OR_KEYWORD, default=None),
         *(P(key, P.KEYWORD_ONLY, default=value) for key, value in defaults.items())])
    update.__name__ = update.__qualname__ = f"{name}_update"
    update.__module__ = module
    update.__doc__ = inspect.cleandoc(doc)
    return update
