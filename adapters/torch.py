"""PyTorch optimizers generated from :data:`mvn_core.rules`.

Each class (:class:`MVNGrad`, :class:`MaxVA`, :class:`NovoGrad`, :class:`Adam`,
:class:`AdaBelief`, :class:`LaProp`, :class:`SGD`) is a real ``torch.optim.Optimizer``:
param groups with their own hyperparameters (read at every step, so every
``lr_scheduler`` works), ``step(closure)``, ``maximize``, ``zero_grad``,
``state_dict``/``load_state_dict``.  The mathematics is the pure rule's: a step hands
each group's parameters and gradients to ``rule.update`` and adds the updates in place.

Hyperparameters keep the core's names and defaults, except that ``(b1, b2)`` is passed
as ``betas`` in torch's way (MaxVA: ``betas=(b1, b2_max)`` and ``b2_min``).  Weight
decay is decoupled (AdamW style) unless ``coupled_weight_decay=True``: ``Adam`` with
``weight_decay`` is ``torch.optim.AdamW``, and ``torch.optim.Adam``'s or ``SGD``'s L2
decay needs ``coupled_weight_decay=True``.  Options of every class: ``maximize``,
``gan`` (Gradient Autoscaled Normalization in front of the rule, per group: ``True`` or
a dict of its options ``center``/``scale``), ``state_dtype`` (e.g. ``torch.float32``
state for bfloat16 parameters), and the execution path (:mod:`._torch_paths`), all
bit for bit the pure rule's results: by default (``foreach=None, fused=None``) one
generated multi-tensor kernel steps all tensors of a group (C with OpenMP on the CPU,
compiled at first use and cached on disk), and where none can be built, the rule runs
on lists of tensors with PyTorch's multi-tensor kernels; ``fused=True`` asks for the
generated kernel (an error where it cannot run), ``foreach=True`` for the multi-tensor
kernels, and ``foreach=False`` calls the pure rule itself.
DTensor parameters (FSDP2, tensor parallelism) step on their local shards
(:mod:`._torch_sharded`), with state sharded like them.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, NamedTuple

import torch

import mvn_core
from mvn_core.registry import Rule

from . import _torch_sharded
from ._common import gan_options

OPTIONS = {"maximize": False, "gan": False, "state_dtype": None, "foreach": None,
           "fused": None}
# The core's names gathered into torch's ``betas`` pair, per rule that has one.
BETAS = {"maxva": ("b1", "b2_max"), "mvn": ("b1", "b2"), "novograd": ("b1", "b2"),
         "adam": ("b1", "b2"), "adabelief": ("b1", "b2"), "laprop": ("b1", "b2")}
STEP = "step"


class _Plan(NamedTuple):
    """A group's checked step: hyperparameters, GAN's new state, the first state of new
    parameters, and the batches (params, grads, buffer columns, count) to run."""

    hyper: dict
    gan_state: Any
    fresh: dict
    batches: list


class RuleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs one rule of :data:`mvn_core.rules`."""

    rule: Rule
    beta_names: tuple[str, ...] = ()

    def __init__(self, params, **hyperparameters):
        defaults = self.torch_defaults()
        unknown = sorted(set(hyperparameters) - set(defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unknown}")
        super().__init__(params, {**defaults, **hyperparameters})

    @classmethod
    def torch_defaults(cls) -> dict[str, Any]:
        """The constructor's defaults: the rule's, in torch's names, and the options."""
        core = dict(cls.rule.defaults)
        betas = tuple(core.pop(name) for name in cls.beta_names)
        return {"lr": core.pop("lr"), **({"betas": betas} if betas else {}), **core, **OPTIONS}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}
        self._check_group(group)
        super().add_param_group(dict(param_group, rule=self.rule.name))

    def _check_group(self, group: dict[str, Any]) -> None:
        if group.get("rule", self.rule.name) != self.rule.name:
            raise ValueError(f"a param group of rule {group['rule']!r} given to {type(self).__name__}")
        self.rule.check_hyperparameters(**self._rule_hyperparameters(group))
        gan_options(group["gan"])
        if not isinstance(group["maximize"], bool):
            raise TypeError(f"maximize must be True or False, got {group['maximize']!r}")
        for option in ("foreach", "fused"):
            if group[option] is not None and not isinstance(group[option], bool):
                raise TypeError(f"{option} must be None, True or False, got {group[option]!r}")
        if group["fused"] and group["foreach"]:
            raise ValueError("foreach=True and fused=True exclude each other")

    def _rule_hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters in the core's names."""
        names = [n for n in self.rule.defaults if n not in self.beta_names]
        hyper = {n: group[n] for n in names}
        if self.beta_names:
            betas = group["betas"]
            if len(betas) != len(self.beta_names):
                raise ValueError(f"betas must be a pair {self.beta_names}, got {betas!r}")
            hyper.update(zip(self.beta_names, betas))
        return hyper

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One step of the rule for every param group; returns ``closure()``'s loss.

        Every group is checked before any parameter changes, so a bad hyperparameter
        or a sparse gradient raises and leaves params and state as they were.  Inside a
        ``torch.compile``-d training step the optimizer step runs eagerly (one graph
        break), so compiling the model changes nothing in the optimizer's arithmetic.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(group) for group in self.param_groups]
        for group, plan in zip(self.param_groups, plans):
            if plan is not None:
                self._apply(group, plan)
        return loss

    def _plan(self, group: dict[str, Any]) -> _Plan | None:
        """Everything one group's step needs, checked as the rule checks it; nothing is
        written yet (GAN's new state and the first state of new parameters are kept
        aside), so that a refusal in any group leaves every group as it was."""
        self._check_group(group)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        for p in params:
            if p.grad.layout is not torch.strided:
                raise TypeError(f"{type(self).__name__} does not support sparse gradients "
                                f"(a parameter of shape {tuple(p.shape)} has one)")
        hyper = self._rule_hyperparameters(group)
        grads = [-p.grad if group["maximize"] else p.grad for p in params]
        gan_state = None
        if gan_options(group["gan"]) is not None:
            grads, gan_state = self._gan(group, params, grads)
        fresh = self._fresh_state(group, params)
        state_of = {id(p): self.state[p] or fresh[id(p)] for p in params}
        unchecked = self._adopt_unchecked_state([p for p in params if id(p) not in fresh],
                                                state_of) | set(fresh)
        grad_of = dict(zip(map(id, params), grads))
        batches = []
        for batch in _split_by(params, lambda p: (id(state_of[id(p)][STEP]), p.device,
                                                  _torch_sharded.mesh_of(p))):
            columns = [[state_of[id(p)][name] for p in batch] for name in self._buffer_names()]
            count = state_of[id(batch[0])][STEP]
            batch_grads = [grad_of[id(p)] for p in batch]
            if any(id(p) in unchecked for p in batch):
                state = self.rule.state_type(count, *(tuple(column) for column in columns))
                self.rule.tensor_rule.checked_call(state, batch_grads, batch, hyper)
            batches.append((batch, batch_grads, columns, count))
        return _Plan(hyper, gan_state, fresh, batches)

    def _apply(self, group: dict[str, Any], plan: _Plan) -> None:
        if plan.gan_state is not None:
            group["gan_state"] = (plan.gan_state.count, plan.gan_state.extra)
        for p in group["params"]:
            if id(p) in plan.fresh:
                self.state[p].update(plan.fresh[id(p)])
        run = _torch_sharded.path(self.path_of(group))
        names = self._buffer_names()
        for batch, grads, columns, count in plan.batches:
            count, columns = run(self.rule, batch, grads, columns, count, plan.hyper)
            for i, p in enumerate(batch):
                self.state[p][STEP] = count
                for name, column in zip(names, columns):
                    self.state[p][name] = column[i]
            self._checked.update((id(p), weakref.ref(count)) for p in batch)

    @property
    def _checked(self) -> dict:
        """The parameters whose state and gradients the rule has checked, by ``id``, each
        with a weak reference to the count it was checked with.  The state is then ours
        (made by the rule, or checked when loaded), and torch itself keeps a ``.grad`` of
        its parameter's shape, dtype and device.  Cleared when a state dict is loaded; a
        state written into ``self.state`` by someone else has another count tensor, and
        is checked again.  Each step checks the rest, and every hyperparameter."""
        if "_checked_counts" not in self.__dict__:
            self.__dict__["_checked_counts"] = {}
        return self.__dict__["_checked_counts"]

    def _is_checked(self, p: torch.Tensor, state: dict) -> bool:
        ref = self._checked.get(id(p))
        return ref is not None and ref() is state.get(STEP)

    def _adopt_unchecked_state(self, params, state_of) -> set[int]:
        """The ``id`` of each parameter whose state this optimizer has not checked, that
        state put where the step needs it (in ``state_of`` only; the step stores it).  A loader that writes into
        ``optimizer.state`` itself (``ZeroRedundancyOptimizer.load_state_dict`` does, and
        moves 0-d tensors such as the count to the CPU) bypasses :meth:`load_state_dict`:
        its tensors go to their parameter's device, and equal counts are shared again so
        that their parameters step together.  The rule checks the result before the step;
        what is not a tensor is left for that check to name."""
        counts: dict[tuple, torch.Tensor] = {}
        keys: dict[int, tuple] = {}  # by id of a count: one read (a sync on a GPU) each
        unchecked = set()
        for p in params:
            state = state_of[id(p)]
            if self._is_checked(p, state):
                continue
            unchecked.add(id(p))
            moved = {name: value.to(p.device) if torch.is_tensor(value) else value
                     for name, value in state.items()}
            step = moved.get(STEP)
            if torch.is_tensor(step) and step.ndim == 0 and not step.is_floating_point():
                if id(state[STEP]) not in keys:
                    keys[id(state[STEP])] = (int(step), step.dtype, p.device)
                moved[STEP] = counts.setdefault(keys[id(state[STEP])], step)
            state_of[id(p)] = moved
        return unchecked

    @staticmethod
    def path_of(group: dict[str, Any]) -> str:
        """The execution path a group's options select (see :mod:`._torch_paths`)."""
        if group["fused"]:
            return "fused"
        if group["foreach"] is None and group["fused"] is None:
            return "kernel"
        return "reference" if group["foreach"] is False else "multi_tensor"

    def _gan(self, group, params, grads):
        """GAN's transformed gradients and its new state (not stored yet).  The state is
        kept in the group as plain ``(count, extra)`` tensors, which ``torch.load``
        reads with ``weights_only=True``."""
        saved = group.get("gan_state")
        device = params[0].device
        state = mvn_core.gan_init(params) if saved is None else mvn_core.GANState(
            saved[0].to(device), tuple(e.to(device) for e in saved[1]))
        return mvn_core.gan_update(state, grads, **gan_options(group["gan"]))

    def _buffer_names(self) -> tuple[str, ...]:
        return self.rule.tensor_rule.buffer_names

    def _fresh_state(self, group, params) -> dict[int, dict]:
        """Zero state for the parameters stepped for the first time, one count per
        device, by ``id`` of the parameter (not stored yet)."""
        fresh = {}
        for batch in _split_by([p for p in params if not self.state[p]], lambda p: p.device):
            state = self.rule.init(batch, state_dtype=group["state_dtype"])
            for i, p in enumerate(batch):
                fresh[id(p)] = {STEP: state.count, **{
                    name: getattr(state, name)[i] for name in self._buffer_names()}}
        return fresh

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``, with a ``step`` tensor of its own per
        parameter.  Parameters stepped together share one count tensor here; a loader
        that writes into a state dict's tensors in place (``torch.distributed.checkpoint``
        does) would otherwise give all of them the count it wrote last."""
        saved = super().state_dict()
        saved["state"] = {key: {**state, STEP: state[STEP].clone()} if STEP in state else state
                          for key, state in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, refusing a state dict of another rule
        or of other shapes before anything changes, and keeping each buffer's own dtype
        (torch would cast float32 state of bfloat16 params to bfloat16)."""
        pairs = self._saved_pairs(state_dict)
        for group in state_dict["param_groups"]:
            if group.get("rule") != self.rule.name:
                saved = group.get("rule", "an optimizer that is not an mvn-core one")
                raise ValueError(f"this state dict was saved by {saved}; "
                                 f"{type(self).__name__} runs {self.rule.name}")
        for saved_id, p in pairs:
            self._check_saved_state(saved_id, p, state_dict["state"].get(saved_id))
        self._checked.clear()
        super().load_state_dict(state_dict)
        self._restore_saved_tensors(pairs, state_dict["state"])

    def _saved_pairs(self, state_dict):
        """(saved id, parameter) pairs, matched in order as torch matches them."""
        saved, groups = state_dict["param_groups"], self.param_groups
        if len(saved) != len(groups):
            raise ValueError(f"the state dict has {len(saved)} param groups, "
                             f"this optimizer {len(groups)}")
        for i, (s, g) in enumerate(zip(saved, groups)):
            if len(s["params"]) != len(g["params"]):
                raise ValueError(f"param group {i} has {len(s['params'])} parameters in the "
                                 f"state dict, {len(g['params'])} in this optimizer")
        return [pair for s, g in zip(saved, groups) for pair in zip(s["params"], g["params"])]

    def _check_saved_state(self, saved_id, p, saved):
        if not saved:
            return
        expected = {STEP, *self._buffer_names()}
        if set(saved) != expected:
            raise ValueError(f"saved state of parameter {saved_id} holds {sorted(saved)}, "
                             f"but {self.rule.name} keeps {sorted(expected)}")
        step = saved[STEP]
        if not (torch.is_tensor(step) and step.ndim == 0 and not step.is_floating_point()):
            raise ValueError(f"saved state of parameter {saved_id}: step must be a 0-d integer tensor")
        dtypes = set()
        for name in self._buffer_names():
            scalar = name in self.rule.tensor_rule.scalar_buffers
            shape = () if scalar else tuple(p.shape)
            value = saved[name]
            if tuple(value.shape) != shape:
                raise ValueError(f"saved state {name!r} of parameter {saved_id} has shape "
                                 f"{tuple(value.shape)}, the parameter needs {shape}")
            if not value.is_floating_point():
                raise TypeError(f"saved state {name!r} of parameter {saved_id} has dtype "
                                f"{value.dtype}: state buffers are floating")
            if not scalar:
                dtypes.add(value.dtype)
        if len(dtypes) > 1:
            raise TypeError(f"saved state of parameter {saved_id} mixes dtypes "
                            f"{sorted(map(str, dtypes))}: a parameter's buffers share one")

    def _restore_saved_tensors(self, pairs, saved_state):
        """Copies of the saved tensors, on their parameter's device, each buffer in its
        saved dtype; the next step shares equal counts again (see
        :meth:`_adopt_unchecked_state`)."""
        for saved_id, p in pairs:
            saved = saved_state.get(saved_id)
            if not saved:
                continue
            for name in self._buffer_names():
                self.state[p][name] = saved[name].to(device=p.device, copy=True)
            self.state[p][STEP] = saved[STEP].to(device=p.device, dtype=torch.int32, copy=True)


def _split_by(items, key) -> list[list]:
    """``items`` in order, split into lists of equal ``key``."""
    out: dict[Any, list] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return list(out.values())


def _make_class(rule: Rule) -> type:
    name = rule.class_name
    cls = type(name, (RuleOptimizer,), {
        "rule": rule, "beta_names": BETAS.get(rule.name, ()), "__module__": __name__,
        "__qualname__": name,
    })
    defaults = cls.torch_defaults()
    parameters = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY if k in OPTIONS
                                     else inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v)
                   for k, v in defaults.items()]
    cls.__signature__ = inspect.Signature(parameters)
    cls.__doc__ = (f"{rule.title} as a ``torch.optim.Optimizer`` ({rule.reference}).\n\n"
                   f"Defaults: {', '.join(f'{k}={v!r}' for k, v in defaults.items())}.\n\n"
                   f"The rule (``mvn_core.{rule.name}_update``):\n\n{rule.doc}")
    return cls


MVNGrad = _make_class(mvn_core.rules["mvn"])
MaxVA = _make_class(mvn_core.rules["maxva"])
NovoGrad = _make_class(mvn_core.rules["novograd"])
Adam = _make_class(mvn_core.rules["adam"])
AdaBelief = _make_class(mvn_core.rules["adabelief"])
LaProp = _make_class(mvn_core.rules["laprop"])
SGD = _make_class(mvn_core.rules["sgd"])

__all__ = ["RuleOptimizer", "MVNGrad", "MaxVA", "NovoGrad", "Adam", "AdaBelief", "LaProp", "SGD"]
