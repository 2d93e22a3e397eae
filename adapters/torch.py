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
a dict of its options ``center``/``scale``), ``state_dtype`` (by default the params',
float32 for bfloat16 and float16 params), ``skip_nonfinite`` (skip a group's step when
a gradient holds a NaN or an Inf, counted in the group's ``"skipped_steps"``; see
:meth:`RuleOptimizer.step`), and the execution path (:mod:`._torch_paths`), all bit for
bit the pure rule in IEEE arithmetic: by default (``foreach=None, fused=None``) one
generated multi-tensor kernel steps all tensors of a group (C with OpenMP on the CPU,
compiled at first use and cached on disk), and where none can be built, the rule runs
on lists of tensors with PyTorch's multi-tensor kernels; ``fused=True`` asks for the
generated kernel (an error where it cannot run), ``foreach=True`` for the multi-tensor
kernels, and ``foreach=False`` calls the pure rule itself (these two with PyTorch's
own square root, which is not correctly rounded on the CPU).
DTensor parameters (FSDP2, tensor parallelism) step on their local shards
(:mod:`._torch_sharded`), with state sharded like them.  A step is all or nothing: it
checks everything before its first write (:meth:`RuleOptimizer.step`).
"""

from __future__ import annotations

import inspect
import math
import numbers
import weakref
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

import mvn_core
from mvn_core._inputs import check_one_device
from mvn_core._rule import COUNT_MAX
from mvn_core.registry import Rule

from . import _torch_sharded
from ._torch_replay import Replay, TrackedState
from ._common import gan_options, may_overlap_itself

OPTIONS = {"maximize": False, "gan": False, "state_dtype": None, "foreach": None,
           "fused": None, "skip_nonfinite": False}
SKIPPED = "skipped_steps"  # a group's count of steps skipped for non-finite gradients
STEP = "step"


class _Batch(NamedTuple):
    """Parameters that share a step count and a device, stepped together."""

    params: list
    grads: list
    buffer_lists: list  # per state buffer, one tensor per parameter
    count: Any


class _Plan(NamedTuple):
    """A group's checked step: hyperparameters, GAN's new state, the first state of the
    parameters that have none yet (by ``id``), and the batches to run; or, for a step
    skipped for non-finite gradients, ``skipped``."""

    hyper: dict
    gan_state: Any = None
    first_states: dict = {}
    batches: list[_Batch] = []
    skipped: bool = False


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
        self.state = TrackedState(self.state)

    @classmethod
    def torch_defaults(cls) -> dict[str, Any]:
        """The constructor's defaults: the rule's, in torch's names, and the options."""
        core = dict(cls.rule.defaults)
        betas = tuple(core.pop(name) for name in cls.beta_names)
        return {"lr": core.pop("lr"), **({"betas": betas} if betas else {}), **core, **OPTIONS}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, SKIPPED: 0, **param_group}
        self._check_group(group)
        super().add_param_group(dict(param_group, rule=self.rule.name,
                                     **{SKIPPED: group[SKIPPED]}))

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As torch's, and a group without an option (saved by an older version, or
        unpickled) gets its default, as ``add_param_group`` gives it."""
        super().__setstate__(state)
        self.state = TrackedState(self.state)
        for group in self.param_groups:
            for name, default in self.defaults.items():
                group.setdefault(name, default)
            group.setdefault(SKIPPED, 0)

    def _check_group(self, group: dict[str, Any]) -> None:
        if not isinstance(group, Mapping):
            raise TypeError(f"a param group is a {type(group).__name__}, not a dict")
        missing = [k for k in ("params", *self.defaults, SKIPPED) if k not in group]
        if missing:
            raise ValueError(f"a param group has no {', '.join(map(repr, missing))}: groups are "
                             "made by the constructor or add_param_group, which fill in the "
                             "defaults")
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
        skipped = group[SKIPPED]
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"{SKIPPED} must be a count of steps (an int >= 0), got {skipped!r}")

    def _rule_hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters in the core's names.  A 1-element tensor counts as
        its 0-d view, as torch.optim takes it."""
        names = [n for n in self.rule.defaults if n not in self.beta_names]
        hyper = {n: _as_scalar(group[n]) for n in names}
        if self.beta_names:
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)):
                raise TypeError(f"betas must be a pair {self.beta_names}, got {betas!r}")
            if len(betas) != len(self.beta_names):
                raise ValueError(f"betas must be a pair {self.beta_names}, got {betas!r}")
            hyper.update(zip(self.beta_names, map(_as_scalar, betas)))
        return hyper

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One step of the rule for every param group; returns ``closure()``'s loss.

        All or nothing: every group is checked before any parameter or state changes
        (hyperparameters, gradients, and that each parameter can be written in place
        and still matches its state), so a step that raises leaves params and state as
        they were, and a retry after fixing the cause takes the step once.  A step
        under ``torch.inference_mode()`` makes ordinary state tensors, which later
        steps can update.  Inside a ``torch.compile``-d training step the optimizer
        step runs eagerly (one graph break), so compiling the model changes nothing in
        the optimizer's arithmetic.

        A group with ``skip_nonfinite=True`` whose gradients hold a NaN or an Inf is
        skipped whole (params, state and GAN's state untouched) and its
        ``"skipped_steps"`` count goes up by one.  Telling reads one flag per device
        from it: a device synchronisation, as ``torch.amp.GradScaler`` makes.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.inference_mode(False), torch.no_grad():
            plans = [self._replayed(group) or self._plan(group) for group in self.param_groups]
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
        strided = torch.strided
        for p in params:  # a few attribute reads each: the step's common case stays cheap
            grad = p.grad
            if (grad.layout is not strided or grad.shape != p.shape or p.is_inference()
                    or not p.is_contiguous() and may_overlap_itself(p.shape, p.stride())):
                self._refuse_unwritable(p)
        hyper = self._rule_hyperparameters(group)
        if group["skip_nonfinite"] and not _all_finite([p.grad for p in params]):
            return _Plan(hyper, skipped=True)
        grads = [-p.grad if group["maximize"] else p.grad for p in params]
        gan_state = None
        if gan_options(group["gan"]) is not None:
            grads, gan_state = self._gan(group, params, grads)
        first_states = self._first_states(group, params)
        state_of = {id(p): self.state[p] or first_states[id(p)] for p in params}
        unchecked = self._adopt_unchecked_state(
            [p for p in params if id(p) not in first_states], state_of) | set(first_states)
        grad_of = dict(zip(map(id, params), grads))
        batches = []
        for batch in _split_by(params, lambda p: (id(state_of[id(p)][STEP]), p.device,
                                                  _torch_sharded.mesh_of(p))):
            buffer_lists = [[state_of[id(p)][name] for p in batch] for name in self._buffer_names()]
            count = state_of[id(batch[0])][STEP]
            batch_grads = [grad_of[id(p)] for p in batch]
            _check_hyperparameter_devices(hyper, batch[0])
            if any(id(p) in unchecked for p in batch):
                state = self.rule.state_type(count, *(tuple(b) for b in buffer_lists))
                self.rule.tensor_rule.checked_call(state, batch_grads, batch, hyper)
            batches.append(_Batch(batch, batch_grads, buffer_lists, count))
        return _Plan(hyper, gan_state, first_states, batches)

    def _refuse_unwritable(self, p: torch.Tensor) -> None:
        """Raise for a parameter that an in-place update would refuse halfway through the
        step: one with a sparse gradient or a gradient of another shape (torch checks a
        new ``.grad`` against its parameter, but ``p.data = ...`` can change the parameter
        afterwards), an inference tensor, one whose elements share memory.  (Devices:
        the rule checks a parameter's state and gradient when it first meets them, and
        the step compares checked state with its parameter every time.)"""
        grad, shape = p.grad, p.shape
        if grad.layout is not torch.strided:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients "
                            f"(a parameter of shape {tuple(shape)} has one)")
        if grad.shape != shape:
            raise ValueError(f"a parameter of shape {tuple(shape)} has a gradient of shape "
                             f"{tuple(grad.shape)} (p.data changed after the backward pass?)")
        if p.is_inference():
            raise ValueError(f"a parameter of shape {tuple(shape)} is an inference tensor (made "
                             "under torch.inference_mode()), which cannot be updated in place "
                             "outside it: optimize a copy made outside inference mode")
        raise ValueError(f"a parameter of shape {tuple(shape)} and strides {p.stride()} has "
                         "elements that share memory (from expand() or as_strided?): they "
                         "cannot be updated in place")

    @staticmethod
    def _refuse_mismatched_state(p: torch.Tensor, name: str, buffer: torch.Tensor) -> None:
        raise ValueError(f"a parameter of shape {tuple(p.shape)} on {p.device} has state "
                         f"{name!r} of shape {tuple(buffer.shape)} on {buffer.device}: the "
                         "parameter was changed after its state was made (p.data = ...?); "
                         "load or reset its state to match")

    def _replayed(self, group: dict[str, Any]) -> Any:
        """The group's step as a replay of its prepared kernel step (checked, ready to
        run), or None: the full step then runs (:mod:`._torch_replay`)."""
        replay = self._replays.get(id(group))
        if replay is None or not self._replayable(group):
            return None
        gathered = replay.gather(group, self.state, keep_grads=group["skip_nonfinite"])
        if gathered is None:
            return None
        self._check_group(group)
        hyper = self._rule_hyperparameters(group)
        _check_hyperparameter_devices(hyper, replay.params[0])
        if group["skip_nonfinite"] and not _all_finite(gathered.grads):
            return _Plan(hyper, skipped=True)
        return replay.ready(gathered, hyper, group["maximize"])

    def _replayable(self, group: dict[str, Any]) -> bool:
        """A group on the kernel path without GAN (which needs every gradient each step)."""
        return self.path_of(group) in ("kernel", "fused") and gan_options(group["gan"]) is None

    @property
    def _replays(self) -> dict:
        """Each group's prepared kernel step, by ``id`` of the group."""
        return self.__dict__.setdefault("_prepared_steps", {})

    def _prepare_replay(self, group: dict[str, Any], plan: _Plan) -> None:
        self._replays.pop(id(group), None)
        if len(plan.batches) != 1 or not self._replayable(group):
            return
        params, grads, buffer_lists, count = plan.batches[0]
        if len(params) == len(group["params"]):
            replay = Replay.prepare(self.rule, params, grads, buffer_lists,
                                    self.state[params[0]][STEP],
                                    self.state)
            if replay is not None:
                self._replays[id(group)] = replay

    def _apply(self, group: dict[str, Any], plan: Any) -> None:
        if not isinstance(plan, _Plan):  # a replay, ready to run
            plan.run()
            return
        if plan.skipped:
            group[SKIPPED] += 1
            return
        if plan.gan_state is not None:
            group["gan_state"] = (plan.gan_state.count, plan.gan_state.extra)
        for p in group["params"]:
            if id(p) in plan.first_states:
                self.state[p].update(plan.first_states[id(p)])
        run = _torch_sharded.path(self.path_of(group))
        names = self._buffer_names()
        for batch, grads, buffer_lists, count in plan.batches:
            count, buffer_lists = run(self.rule, batch, grads, buffer_lists, count, plan.hyper)
            for i, p in enumerate(batch):
                self.state[p][STEP] = count
                for name, buffer_list in zip(names, buffer_lists):
                    self.state[p][name] = buffer_list[i]
            self._checked_counts.update((id(p), weakref.ref(count)) for p in batch)
        self._prepare_replay(group, plan)

    @property
    def _checked_counts(self) -> dict:
        """The parameters whose state and gradients the rule has checked, by ``id``, each
        with a weak reference to the count it was checked with.  The state is then ours
        (made by the rule, or checked when loaded), and torch itself keeps a ``.grad`` of
        its parameter's shape, dtype and device.  Cleared when a state dict is loaded; a
        state written into ``self.state`` by someone else has another count tensor, and
        is checked again.  Each step checks the rest, and every hyperparameter."""
        if "_checked_counts" not in self.__dict__:
            self.__dict__["_checked_counts"] = {}
        return self.__dict__["_checked_counts"]

    def _adopt_unchecked_state(self, params, state_of) -> set[int]:
        """The ``id`` of each parameter whose state this optimizer has not checked, that
        state put where the step needs it (in ``state_of`` only; the step stores it).  A loader that writes into
        ``optimizer.state`` itself (``ZeroRedundancyOptimizer.load_state_dict`` does, and
        moves 0-d tensors such as the count to the CPU) bypasses :meth:`load_state_dict`:
        its tensors go to their parameter's device, and equal counts are shared again so
        that their parameters step together, and an inference tensor (written under
        ``torch.inference_mode()``) is copied into one the step can update in place.  The
        rule checks the result before the step; what is not a tensor is left for that
        check to name.  Checked state is only compared with its parameter's shape and
        device, which ``p.data = ...`` may have changed."""
        counts: dict[tuple, torch.Tensor] = {}
        keys: dict[int, tuple] = {}  # by id of a count: one read (a sync on a GPU) each
        unchecked = set()
        shaped, checked = self._shaped_buffer, self._checked_counts
        for p in params:
            state = state_of[id(p)]
            ref = checked.get(id(p))
            if ref is not None and ref() is state.get(STEP):  # checked: does p still match?
                buffer = state[shaped]
                if buffer.shape != p.shape or buffer.device != p.device:
                    self._refuse_mismatched_state(p, shaped, buffer)
                continue
            unchecked.add(id(p))
            moved = {name: value.to(p.device) if torch.is_tensor(value) else value
                     for name, value in state.items()}
            for name, value in moved.items():  # what a step cannot write in place
                if torch.is_tensor(value) and value.is_inference():
                    moved[name] = value.clone()  # an ordinary tensor: inference mode is off
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

    @property
    def _shaped_buffer(self) -> str:
        """A buffer shaped like its parameter (every rule has one)."""
        scalar = self.rule.tensor_rule.scalar_buffers
        return next(name for name in self._buffer_names() if name not in scalar)

    def _first_states(self, group, params) -> dict[int, dict]:
        """Zero state for the parameters stepped for the first time, one count per
        device, by ``id`` of the parameter (not stored yet)."""
        first = {}
        for batch in _split_by([p for p in params if not self.state[p]], lambda p: p.device):
            state = self.rule.init(batch, state_dtype=group["state_dtype"])
            for i, p in enumerate(batch):
                first[id(p)] = {STEP: state.count, **{
                    name: getattr(state, name)[i] for name in self._buffer_names()}}
        return first

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``, with a ``step`` tensor of its own per
        parameter.  Parameters stepped together share one count tensor here; a loader
        that writes into a state dict's tensors in place (``torch.distributed.checkpoint``
        does) would otherwise give all of them the count it wrote last."""
        saved = super().state_dict()
        # Entries that are not a parameter's (state-dict hooks add some) are kept as they are.
        saved["state"] = {key: {**state, STEP: state[STEP].clone()}
                          if isinstance(state, dict) and torch.is_tensor(state.get(STEP)) else state
                          for key, state in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, refusing a state dict of another rule,
        of other shapes, with out-of-range hyperparameters or counts, before anything
        changes; keeping each buffer's own dtype (torch would cast float32 state of
        bfloat16 params to bfloat16).  As torch does, it takes a ``step`` saved as a
        plain number (older state dicts), keeps entries that are not a parameter's, and
        gives a group saved without an option (``maximize``, ``foreach``, ...) its default."""
        _check_layout(state_dict)
        pairs = self._saved_pairs(state_dict)
        for group in state_dict["param_groups"]:
            if group.get("rule") != self.rule.name:
                saved = group.get("rule", "an optimizer that is not an mvn-core one")
                raise ValueError(f"this state dict was saved by {saved}; "
                                 f"{type(self).__name__} runs {self.rule.name}")
            self._check_group({**self.defaults, SKIPPED: 0, **group})
        saved_state = state_dict["state"]
        counts = {saved_id: self._checked_saved_state(saved_id, p, saved_state.get(saved_id))
                  for saved_id, p in pairs}
        self._checked_counts.clear()
        with torch.inference_mode(False):  # copies that later steps can update in place
            super().load_state_dict(state_dict)
            self._restore_saved_tensors(pairs, state_dict["state"], counts)

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

    def _checked_saved_state(self, saved_id, p, saved) -> int | None:
        """Refuse what the parameter's saved state cannot be; its count (None: no state)."""
        if saved is None or (isinstance(saved, Mapping) and not saved):
            return None
        if not isinstance(saved, Mapping):
            raise TypeError(f"saved state of parameter {saved_id} is a {type(saved).__name__}, "
                            "not a dict")
        expected = {STEP, *self._buffer_names()}
        if set(saved) != expected:
            raise ValueError(f"saved state of parameter {saved_id} holds {sorted(saved, key=str)}, "
                             f"but {self.rule.name} keeps {sorted(expected)}")
        count = _saved_count(saved_id, saved[STEP])
        dtypes = set()
        for name in self._buffer_names():
            scalar = name in self.rule.tensor_rule.scalar_buffers
            shape = () if scalar else tuple(p.shape)
            value = saved[name]
            if not torch.is_tensor(value):
                raise TypeError(f"saved state {name!r} of parameter {saved_id} is a "
                                f"{type(value).__name__}, not a tensor")
            if value.is_meta:
                raise ValueError(f"saved state {name!r} of parameter {saved_id} is a meta tensor, "
                                 "which holds no values")
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
        return count

    def _restore_saved_tensors(self, pairs, saved_state, counts):
        """Copies of the saved tensors, on their parameter's device, each buffer in its
        saved dtype, and the ``counts`` read when they were checked; the next step shares
        equal counts again (see :meth:`_adopt_unchecked_state`)."""
        for saved_id, p in pairs:
            if counts[saved_id] is None:
                continue
            saved = saved_state[saved_id]
            for name in self._buffer_names():
                self.state[p][name] = saved[name].to(device=p.device, copy=True)
            self.state[p][STEP] = torch.tensor(counts[saved_id], dtype=torch.int32,
                                               device=p.device)


def _as_scalar(value: Any) -> Any:
    """A 1-element tensor as its 0-d view (torch.optim takes ``lr=torch.tensor([0.1])``);
    anything else as it is, for the rule to check."""
    if torch.is_tensor(value) and value.ndim > 0 and value.numel() == 1:
        return value.reshape(())
    return value


def _check_hyperparameter_devices(hyper: dict, p: torch.Tensor) -> None:
    """Tensor hyperparameters where the step can use them: on the parameters' device,
    or 0-d on the CPU (which torch computes with as with a number)."""
    tensors = [(name, v) for name, v in hyper.items() if torch.is_tensor(v)]
    if tensors:
        check_one_device([("a parameter", p)], tensors)


def _all_finite(grads: list) -> bool:
    """Whether every gradient is finite: one multi-tensor sum of magnitudes per device
    (a NaN or an Inf makes its tensor's sum non-finite, on every device: unlike a
    maximum, which some kernels take with NaN-ignoring instructions) and one read of
    its flag.  A sum of finite magnitudes could overflow only for gradients far beyond
    the range the rules support (``|g| <= 2**62``, docs/rules.md): such a step is skipped too."""
    sharded = [g for g in grads if isinstance(g, _torch_sharded.DTensor)]
    if sharded and not bool(mvn_core.all_finite(sharded)):  # reduced over the processes
        return False
    plain = [g for g in grads if not isinstance(g, _torch_sharded.DTensor)]
    for same_device in _split_by(plain, lambda g: g.device):
        sums = torch._foreach_norm(same_device, 1)
        if not bool(torch.isfinite(torch.stack(sums)).all()):
            return False
    return True


def _saved_count(saved_id, step) -> int:
    """A saved ``step``: a 0-d integer tensor or (older state dicts) a plain whole number,
    in [0, 2**31 - 1]; its value."""
    if torch.is_tensor(step):
        if step.ndim != 0 or step.is_floating_point() or step.dtype is torch.bool or step.is_meta:
            raise ValueError(f"saved state of parameter {saved_id}: step must be a 0-d integer "
                             f"tensor or a whole number, got a tensor of shape "
                             f"{tuple(step.shape)} and dtype {step.dtype}")
        value = int(step)
    elif isinstance(step, numbers.Real) and not isinstance(step, bool) \
            and math.isfinite(step) and step == int(step):
        value = int(step)
    else:
        raise ValueError(f"saved state of parameter {saved_id}: step must be a 0-d integer "
                         f"tensor or a whole number, got {step!r}")
    if not 0 <= value <= COUNT_MAX:
        raise ValueError(f"saved state of parameter {saved_id}: step={value} is out of range: "
                         "a step count lies in [0, 2**31 - 1]")
    return value


def _check_layout(state_dict: Any) -> None:
    """A state dict has ``state`` (a dict) and ``param_groups`` (a list of dicts, each
    with a list of ``params``)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"a state dict is a dict, got a {type(state_dict).__name__}")
    for key, kind in (("state", Mapping), ("param_groups", (list, tuple))):
        if key not in state_dict:
            raise ValueError(f"the state dict has no {key!r} (it holds "
                             f"{sorted(state_dict, key=str)})")
        if not isinstance(state_dict[key], kind):
            raise TypeError(f"the state dict's {key!r} is a {type(state_dict[key]).__name__}")
    for i, group in enumerate(state_dict["param_groups"]):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), (list, tuple)):
            raise TypeError(f"param group {i} of the state dict is not a dict with a list of "
                            "'params'")


def _split_by(items, key) -> list[list]:
    """``items`` in order, split into lists of equal ``key``."""
    out: dict[Any, list] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return list(out.values())


def optimizer_class(rule: Rule | str, name: str | None = None) -> type[RuleOptimizer]:
    """The ``torch.optim.Optimizer`` class of ``rule`` (a :class:`mvn_core.Rule`, a user's
    made with :func:`mvn_core.define_rule`, or a registered rule's name), called
    ``name`` (default: the rule's ``class_name``).  The pair the rule declares as
    ``betas`` is passed as torch's ``betas``."""
    rule = mvn_core.rules[rule] if isinstance(rule, str) else rule
    if rule.kind != "optimizer":
        raise ValueError(f"{rule.name} is a gradient {rule.kind}, not an optimizer: put it in "
                         "front of one with its gan=... option")
    name = name or rule.class_name
    cls = type(name, (RuleOptimizer,), {
        "rule": rule, "beta_names": rule.betas, "__module__": __name__, "__qualname__": name,
    })
    defaults = cls.torch_defaults()
    parameters = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY if k in OPTIONS
                                     else inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v)
                   for k, v in defaults.items()]
    cls.__signature__ = inspect.Signature(parameters)
    cls.__doc__ = (f"{rule.title} as a ``torch.optim.Optimizer`` ({rule.reference}).\n\n"
                   f"Defaults: {', '.join(f'{k}={v!r}' for k, v in defaults.items())}.\n\n"
                   f"The rule (``{rule.update.__module__}.{rule.name}_update``):\n\n{rule.doc}")
    return cls


OPTIMIZERS = MappingProxyType({rule.name: optimizer_class(rule)
                               for rule in mvn_core.rules.values() if rule.kind == "optimizer"})

__all__ = ["RuleOptimizer", "optimizer_class", "OPTIMIZERS"]
for _cls in OPTIMIZERS.values():  # MVNGrad, Adam, ...: every registered optimizer
    globals()[_cls.__name__] = _cls
    __all__.append(_cls.__name__)
del _cls
