"""Keras 3 optimizers generated from :data:`mvn_core.rules`, on its JAX, PyTorch and
TensorFlow backends.

Each class, one per rule of the registry (:class:`MVNGrad`, :class:`Adam`, ...), is a
``keras.optimizers.Optimizer``::

    model.compile(optimizer=MVNGrad(learning_rate=1e-3, weight_decay=0.01), loss=...)
    model.fit(x, y)

A step hands the gradients, the variables' values and the state of all variables to
the rule's pure ``update`` at once, as the backend's own arrays (TensorFlow's wrapped by
:mod:`mvn_core.backends.tensorflow_namespace`), and assigns what it returns: the
trajectory is the pure rule's.  It runs where Keras runs the optimizer: eagerly, in
``tf.function``, or traced by ``jax.jit`` through Keras's ``stateless_apply``.

- Hyperparameters keep the core's names and defaults (``b1``, ``b2``, ``eps``, ...),
  except ``learning_rate``: a float, a ``keras.optimizers.schedules`` schedule or a
  callable, as for Keras's own optimizers (a schedule is read at Keras's iteration
  count, so the first step uses ``schedule(0)``).
- The state lives in Keras variables, one per buffer and model variable, named after
  the model variable's path and the buffer (``dense_kernel_m``, ``..._v``, ...), with
  the shapes and dtypes that the rule's ``init`` gives (``state_dtype``, e.g.
  ``"float32"``, overrides them); the step count is Keras's ``iterations``.  So
  ``model.save`` and ``keras.models.load_model`` keep the state, and a run resumed from
  a saved model continues as the uninterrupted one would.  Import this module before
  ``load_model``: importing it registers the classes with Keras.
- ``weight_decay`` is the rule's (decoupled unless ``coupled_weight_decay=True``;
  NovoGrad's enters its momentum), computed inside the rule's step, not by Keras's base
  class; ``exclude_from_weight_decay`` works as in Keras (the excluded variables
  step with no weight decay).
- Keras applies ``clipnorm``, ``clipvalue``, ``global_clipnorm``, loss scaling and
  ``gradient_accumulation_steps`` to the gradients before the rule sees them, and
  ``use_ema`` after the step, as for its own optimizers.
- ``gan=True`` (or a dict of GAN's options, ``center``/``scale`` by name) puts Gradient
  Autoscaled Normalization in front of the rule, over the gradients of all variables.
- ``skip_nonfinite=True`` skips every step whose gradients hold a NaN or an Inf, as
  :func:`mvn_core.skip_if_nonfinite` does: the variables, the state and ``iterations``
  (the rule's count) stay as they were, so ``optimizer.iterations`` not advancing tells
  a skipped step.  By default non-finite gradients are computed as IEEE arithmetic
  does (see the rule).  Keras's ``LossScaleOptimizer`` around one of these skips
  such steps too, and adjusts its scale.
- TensorFlow: the default distribution strategy only (``tf.distribute`` strategies
  with several replicas are not supported).
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from types import MappingProxyType
from typing import Any, Mapping

import keras

from mvn_core import Rule, rules

from ._common import check_with_learning_rate, gan_options

GAN = rules["gan"]
PACKAGE = "mvn_core"  # the classes' package in Keras's registry ("mvn_core>MVNGrad")


class RuleOptimizer(keras.optimizers.Optimizer):
    """A Keras optimizer that runs one rule of :data:`mvn_core.rules` (generic: the
    classes made by :func:`optimizer_class` set ``rule``)."""

    rule: Rule | None = None

    def __init__(self, learning_rate: Any = None, *, gan: bool | Mapping = False,
                 state_dtype: Any = None, skip_nonfinite: bool = False, name: str | None = None,
                 **kwargs: Any) -> None:
        if self.rule is None:
            raise TypeError("RuleOptimizer is generic: use a class made by optimizer_class(rule), "
                            "e.g. mvn_core.adapters.keras.MVNGrad")
        if "lr" in kwargs:
            raise TypeError(f"{type(self).__name__} takes learning_rate (Keras's name), not lr")
        hyper = {k: kwargs.pop(k) for k in list(kwargs) if k in self.rule.defaults}
        if hyper.get("weight_decay", 0.0) is None:  # Keras's spelling of "none"
            hyper["weight_decay"] = 0.0
        if learning_rate is None:
            learning_rate = self.rule.defaults["lr"]
        _check(self.rule, hyper, learning_rate)
        gan = _checked_gan(gan)
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
        hyper = {k: v for k, v in {**self.rule.defaults, **hyper}.items() if k != "lr"}
        # Keras's base class keeps weight_decay too (for get_config); the rule applies it
        super().__init__(learning_rate=_as_keras_rate(learning_rate),
                         weight_decay=hyper["weight_decay"], name=name, **kwargs)
        self._hyper = hyper
        self.gan = gan
        self.skip_nonfinite = skip_nonfinite
        self.state_dtype = None if state_dtype is None else keras.backend.standardize_dtype(
            state_dtype)

    @property
    def hyperparameters(self) -> Mapping[str, Any]:
        """The rule's hyperparameters but the learning rate (fixed when the optimizer is
        made: Keras traces them into its compiled step)."""
        return MappingProxyType(self._hyper)

    def build(self, variables: list) -> None:
        """One state variable per buffer and model variable, shaped and typed as the
        rule's ``init`` makes its buffers for that variable."""
        if self.built:
            return
        replicas = getattr(getattr(self, "_distribution_strategy", None), "num_replicas_in_sync", 1)
        if replicas > 1:
            raise ValueError(f"{type(self).__name__} runs under TensorFlow's default distribution "
                             f"strategy only; this one has {replicas} replicas")
        super().build(variables)
        names = self.rule.tensor_rule.buffer_names
        self._buffers = [[] for _ in names]
        for variable in variables:
            state = self.rule.init([_core_array(variable)], state_dtype=self.state_dtype)
            for buffer_list, buffer_name in zip(self._buffers, names):
                buffer_list.append(self._state_variable(variable, buffer_name,
                                                   getattr(state, buffer_name)[0]))

    def _state_variable(self, variable, buffer_name: str, like: Any):
        layout = getattr(variable, "_layout", None) if tuple(like.shape) == tuple(
            variable.shape) else None
        return self.add_variable(shape=tuple(like.shape), initializer="zeros",
                                 dtype=keras.backend.standardize_dtype(like.dtype),
                                 layout=layout, name=f"{_path(variable)}_{buffer_name}")

    def _apply_weight_decay(self, variables) -> None:
        """Nothing: the rule applies ``weight_decay`` inside its step."""

    def _backend_update_step(self, grads, trainable_variables, learning_rate) -> None:
        """One step of the rule for all variables: GAN (if on) over every gradient, then
        the rule, in one call per weight-decay setting (one when nothing is excluded).
        Everything is computed before anything is assigned."""
        with _no_autograd():
            finite = _all_finite(grads) if self.skip_nonfinite and grads else None
            count = _core_array(self.iterations)
            grads = [_core_array(g) for g in grads]
            if self.gan is not None:
                grads, _ = GAN.update(GAN.state_type(count), grads, **self.gan)
            rate = _core_array(learning_rate)
            steps = [self._step(count, [grads[i] for i in group],
                                [trainable_variables[i] for i in group], rate, weight_decay)
                     for group, weight_decay in self._weight_decay_groups(trainable_variables)]
            for assignments in steps:
                for assign, target, value in assignments:
                    value = _native(value)
                    if finite is not None:  # a skipped step adds -0.0 and keeps the state
                        kept = (-keras.ops.zeros_like(value) if assign == self.assign_add
                                else target.value)
                        value = keras.ops.where(finite, value, kept)
                    assign(target, value)
            if finite is not None:  # Keras advances iterations after this: not when skipped
                self.iterations.assign_add(
                    keras.ops.cast(keras.ops.where(finite, 0, -1), self.iterations.dtype))

    def _weight_decay_groups(self, variables) -> list[tuple[list[int], float]]:
        weight_decay = self._hyper.get("weight_decay", 0.0)
        every = list(range(len(variables)))
        if weight_decay == 0.0:
            return [(every, weight_decay)]
        decayed = [i for i in every if self._use_weight_decay(variables[i])]
        excluded = [i for i in every if i not in decayed]
        return [(g, wd) for g, wd in ((decayed, weight_decay), (excluded, 0.0)) if g]

    def _step(self, count, grads, variables, rate, weight_decay) -> list[tuple]:
        """The rule's step for ``variables``: the assignments it makes, as
        ``(assign, variable, value)`` (``p += update``, then each buffer)."""
        indices = [self._get_variable_index(v) for v in variables]
        state = self.rule.state_type(count, *(
            tuple(_core_array(buffer_list[i]) for i in indices) for buffer_list in self._buffers))
        params = [_core_array(v) for v in variables]
        hyper = {**self._hyper, "weight_decay": weight_decay}
        updates, new = self.rule.update(state, grads, params, lr=rate, **hyper)
        out = [(self.assign_add, v, u) for v, u in zip(variables, updates)]
        for buffer_list, new_buffer_list in zip(self._buffers, new[1:]):
            out += [(self.assign, buffer_list[i], value)
                    for i, value in zip(indices, new_buffer_list)]
        return out

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({name: value for name, value in self._hyper.items()
                       if name != "weight_decay"})
        config.update(gan=None if self.gan is None else dict(self.gan),
                      state_dtype=self.state_dtype, skip_nonfinite=self.skip_nonfinite)
        return config


def _check(rule: Rule, hyper: dict, learning_rate: Any) -> None:
    """The rule's own check, with Keras's name for the learning rate; the other
    hyperparameters must be Python values (Keras saves them in the model's config)."""
    for name, value in hyper.items():
        if not isinstance(value, (bool, numbers.Real)):
            raise TypeError(f"{name} must be a Python number or bool, got a "
                            f"{type(value).__name__} (only learning_rate takes a schedule)")
    check_with_learning_rate(rule, hyper, learning_rate)


def _as_keras_rate(learning_rate: Any) -> Any:
    """Keras takes a float (not an int), a schedule or a callable."""
    if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
        return float(learning_rate)
    return learning_rate


def _checked_gan(option: Any) -> dict | None:
    options = gan_options(option)
    if options is not None and callable(options["scale"]):
        raise TypeError("gan's scale must be one of GAN's named strategies here: a callable "
                        "cannot be saved with a Keras model")
    return options


def _path(variable) -> str:
    return str(getattr(variable, "path", variable.name)).replace("/", "_").replace(":", "_")


# --- the backend's arrays, as the core takes them ---------------------------------------------

def _core_array(x: Any) -> Any:
    """A Keras variable's current value (inside a stateless scope too), a backend tensor
    or a Python number, as the core takes it: the backend's array (TensorFlow's wrapped
    in its namespace), or the number itself."""
    if isinstance(x, keras.Variable):
        x = x.value
    if isinstance(x, numbers.Real):
        return x
    if keras.backend.backend() == "tensorflow":
        from mvn_core.backends import tensorflow_namespace

        return tensorflow_namespace.asarray(x)
    return x


def _native(x: Any) -> Any:
    """The backend tensor of an array the core returned."""
    return getattr(x, "tensor", x) if keras.backend.backend() == "tensorflow" else x


def _all_finite(grads: list) -> Any:
    """One boolean: every entry of every gradient is finite."""
    return keras.ops.all(keras.ops.stack([keras.ops.all(keras.ops.isfinite(g)) for g in grads]))


def _no_autograd():
    """PyTorch records no graph of the step (Keras's trainer also disables it)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


# --- the generated classes ---------------------------------------------------------------------

def optimizer_class(rule: Rule | str) -> type[RuleOptimizer]:
    """The Keras optimizer class of ``rule`` (a :class:`Rule` or its name), registered
    with Keras as ``"mvn_core>" + rule.class_name``."""
    rule = rules[rule] if isinstance(rule, str) else rule
    if rule.kind != "optimizer":
        raise ValueError(f"{rule.name} is a gradient {rule.kind}, not an optimizer: put it in "
                         "front of one with its gan=... option")
    name = rule.class_name
    cls = type(name, (RuleOptimizer,), {
        "rule": rule, "__doc__": _class_doc(rule), "__module__": __name__, "__qualname__": name})
    cls.__signature__ = _signature(rule)
    return keras.saving.register_keras_serializable(package=PACKAGE, name=name)(cls)


def _signature(rule: Rule) -> inspect.Signature:
    P = inspect.Parameter
    parameters = [P("learning_rate", P.POSITIONAL_OR_KEYWORD, default=rule.defaults["lr"])]
    parameters += [P(k, P.KEYWORD_ONLY, default=v) for k, v in rule.defaults.items() if k != "lr"]
    parameters += [P("gan", P.KEYWORD_ONLY, default=False),
                   P("state_dtype", P.KEYWORD_ONLY, default=None),
                   P("skip_nonfinite", P.KEYWORD_ONLY, default=False),
                   P("name", P.KEYWORD_ONLY, default=None), P("kwargs", P.VAR_KEYWORD)]
    return inspect.Signature(parameters)


def _class_doc(rule: Rule) -> str:
    defaults = ", ".join(f"{k}={v!r}" for k, v in rule.defaults.items() if k != "lr")
    return (f"{rule.title} ({rule.reference}) as a ``keras.optimizers.Optimizer``: see "
            f":mod:`mvn_core.adapters.keras`.\n\n``learning_rate`` (default "
            f"{rule.defaults['lr']!r}) and the rule's hyperparameters: {defaults}; ``gan``, "
            "``state_dtype``, and Keras's own arguments (``clipnorm``, ``global_clipnorm``, "
            "``use_ema``, ``gradient_accumulation_steps``, ``loss_scale_factor``, ``name``, "
            f"...).\n\nEach step calls ``mvn_core.{rule.name}_update``:\n\n{rule.doc}\n")


OPTIMIZERS: Mapping[str, type[RuleOptimizer]] = MappingProxyType(
    {name: optimizer_class(rule) for name, rule in rules.items() if rule.kind == "optimizer"})

__all__ = ["RuleOptimizer", "optimizer_class", "OPTIMIZERS"]
for _cls in OPTIMIZERS.values():  # MVNGrad, Adam, ...: every registered optimizer
    globals()[_cls.__name__] = _cls
    __all__.append(_cls.__name__)
del _cls
