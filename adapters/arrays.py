"""In-place optimizers over lists of NumPy or CuPy arrays, one per rule of :data:`mvn_core.rules`.

::

    opt = MVNGrad(params, lr=1e-3)       # params: a list of NumPy (or CuPy) arrays
    for batch in batches:
        opt.step(gradients(params, batch))   # each array of params is updated in place
    saved = opt.state_dict()             # NumPy copies only: pickle it, load it anywhere

The classes are generated from the registry by :func:`optimizer_class`, not written
one by one: an optimizer moves arrays between the caller and the rule's pure
``update`` and keeps the state, so its trajectory is the pure rule's, bit for bit.
Its only arithmetic is ``p += update``, in the parameter's dtype, which is what
:func:`mvn_core.apply_updates` computes (there into a new array).
"""

from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import array_api_compat
import numpy as np

from mvn_core import Rule, all_finite, backends, rules
from mvn_core._rule import COUNT_MAX, next_count

from ._common import gan_options, may_overlap_itself

# The libraries whose arrays can be written in place (``p += u``) and moved to the host.
LIBRARIES = ("numpy", "cupy")
GAN = rules["gan"]
STATE_DICT_KEYS = ("rule", "hyperparameters", "state", "gan")
OPTIONAL_STATE_DICT_KEYS = ("skipped_steps",)  # absent from older state dicts


class ArrayOptimizer:
    """A stateful optimizer for one rule over a list of NumPy or CuPy arrays.

    Generic: the classes made by :func:`optimizer_class` (``MVNGrad``, ``Adam``, ...)
    set ``rule``.  ``params`` are held (as a tuple of the caller's very arrays) and
    updated in place by :meth:`step`.

    ``hyperparameters`` is a public dict, read at every step, so a schedule may change
    ``opt.hyperparameters["lr"]`` between steps; a value is checked when the optimizer
    is made and again at the step that uses it.  ``gan`` puts Gradient Autoscaled
    Normalization in front of the rule: ``False``, ``True`` (its defaults) or a dict of
    its options (``{"center": "channel"}``); its options are in ``opt.gan`` (None when
    off).  ``state_dtype`` goes to the rule's ``init``, e.g. float64 state for float32
    params (by default the params' dtype; float32 for float16 params).

    ``fused`` chooses how a step runs.  ``None`` (the default): on NumPy arrays, one
    generated C kernel steps every array in one call (:mod:`._cpu_kernel`: compiled at
    first use, cached on disk; bit for bit the pure rule on NumPy), where the arrays
    are contiguous and a C compiler is found, else the pure rule; on CuPy arrays, the
    pure rule.  ``True``: the generated kernel, on NumPy as above (an error where it
    cannot run) and on CuPy one generated CUDA kernel launch for all arrays
    (:mod:`._cupy_fused`; C-contiguous float16, float32 and float64 arrays).
    ``False``: the pure rule, always.

    ``skip_nonfinite=True`` (a public attribute, changeable between steps) skips every
    step whose gradients hold a NaN or an Inf: params, state and GAN's state stay as
    they were, and ``skipped_steps`` counts it.  Telling needs the gradients' values on
    the host: with CuPy, one device synchronisation per step.  By default non-finite
    gradients are computed as IEEE arithmetic does (see the rule's docstring).
    """

    rule: ClassVar[Rule | None] = None

    def __init__(self, params: Any, *, gan: bool | Mapping = False, state_dtype: Any = None,
                 fused: bool | None = None, skip_nonfinite: bool = False,
                 **hyperparameters: Any) -> None:
        if self.rule is None:
            raise TypeError("ArrayOptimizer is generic: use a class made by optimizer_class(rule), "
                            "e.g. mvn_core.adapters.arrays.Adam")
        _check_hyperparameters(self.rule, hyperparameters)
        gan = gan_options(gan)
        _refuse_one_array(params)
        state = self.rule.init(params, state_dtype=state_dtype)
        gan_state = None if gan is None else GAN.init(params, state_dtype=state_dtype)
        params = tuple(params)
        self._library = _library_of(params)
        _check_writable(params)
        _check_disjoint(params)
        self._path = _path_of(fused, self._library)
        self.skip_nonfinite = _checked_flag("skip_nonfinite", skip_nonfinite)
        self.skipped_steps = 0
        self.params = params
        self.hyperparameters = {**self.rule.defaults, **hyperparameters}
        self._gan = gan
        self._device = array_api_compat.device(params[0])
        self._state, self._gan_state = state, gan_state

    @property
    def path(self) -> str:
        """How steps run (fixed when the optimizer is made): ``"kernel"`` (the generated
        CPU kernel, where the arrays allow, else the pure rule), ``"kernel-only"``
        (``fused=True`` on NumPy), ``"cupy-kernel"`` or ``"pure"``."""
        return self._path

    @property
    def state(self) -> Any:
        """The rule's state (a NamedTuple of the params' library), as of the last step."""
        return self._state

    @property
    def gan(self) -> dict | None:
        """GAN's options (a dict that may be changed between steps), None when GAN is off."""
        return self._gan

    @property
    def gan_state(self) -> Any:
        """GAN's state, None when GAN is off."""
        return self._gan_state

    def step(self, grads: Any) -> None:
        """One step: ``p += update`` for each parameter, with the updates of the rule
        (fed GAN's transformed gradients when ``gan`` is on).

        ``grads`` is a list or tuple of arrays shaped like ``params``.  Everything is
        checked and computed before anything is written, so a step that raises (grads
        that do not match, a hyperparameter changed to a bad value) leaves the params
        and the state as they were.
        """
        _check_hyperparameters(self.rule, self.hyperparameters)
        _check_writable(self.params)
        if self._gan is not None:
            _check_hyperparameters(GAN, self._gan)
        if _checked_flag("skip_nonfinite", self.skip_nonfinite) and not bool(all_finite(grads)):
            # checked as a step would check them, then skipped
            self.rule.tensor_rule.checked_call(self._state, grads, self.params,
                                               self.hyperparameters)
            self.skipped_steps += 1
            return
        gan_state = self._gan_state
        if self._gan is not None:
            grads, gan_state = GAN.update(gan_state, grads, self.params, **self._gan)
        if self._path != "pure":
            state = self._kernel_step(grads)
            if state is not None:
                self._state, self._gan_state = state, gan_state
                return
        updates, state = self.rule.update(self._state, grads, self.params, **self.hyperparameters)
        for p, u in zip(self.params, updates):
            p += u.astype(p.dtype, copy=False)
        self._state, self._gan_state = state, gan_state

    def _kernel_step(self, grads: Any) -> Any:
        """A step through a generated kernel, in place, after the rule's own checks: the
        new state, or None where the kernel cannot take these arrays (the pure rule
        runs instead)."""
        call, hyper = self.rule.tensor_rule.checked_call(self._state, grads, self.params,
                                                         self.hyperparameters)
        if self._path == "cupy-kernel":
            from . import _cupy_fused

            return _cupy_fused.step(self.rule, self._state, self.params, call.grads, hyper)
        new = _numpy_kernel_step(self.rule, self._state, self.params, call.grads, hyper)
        if new is None and self._path == "kernel-only":
            raise RuntimeError(f"fused=True cannot run here: {_kernel_refusal(self.params)}")
        return new

    def state_dict(self) -> dict:
        """A plain, picklable dict: the rule's name, the hyperparameters, the state and GAN's.

        Every array in it is a NumPy copy on the host, so a state saved from CuPy loads
        into a NumPy optimizer and the other way round, and changing the dict changes
        nothing here.
        """
        return {
            "rule": self.rule.name,
            "hyperparameters": self._to_host(dict(self.hyperparameters)),
            "state": self._to_host(self._state._asdict()),
            "gan": None if self._gan is None else {
                "options": dict(self._gan), "state": self._to_host(self._gan_state._asdict())},
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Take the hyperparameters and the state of ``state_dict`` (from :meth:`state_dict`).

        It must come from the same rule, with GAN on or off alike, and hold as many
        arrays as there are params, each of the shape and dtype that this optimizer's
        state has (so make it with the same ``state_dtype``).  Anything else raises a
        ``ValueError``/``TypeError`` and changes nothing.  The arrays are copied to the
        params' library and device.
        """
        _check_keys("state_dict", state_dict, STATE_DICT_KEYS, OPTIONAL_STATE_DICT_KEYS)
        skipped = state_dict.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"state_dict['skipped_steps'] is {skipped!r}: a count of steps "
                             "(an int >= 0) is needed")
        if state_dict["rule"] != self.rule.name:
            raise ValueError(f"the state_dict was saved by a {state_dict['rule']!r} optimizer; "
                             f"this one is {self.rule.name!r}")
        hyper = _checked_saved_hyperparameters(self.rule, state_dict["hyperparameters"])
        state = _checked_state(f"{self.rule.name} state", state_dict["state"], self._state)
        saved_gan, gan_state = self._checked_gan(state_dict["gan"])
        hyper, state, gan_state = (self._from_host(x) for x in (hyper, state, gan_state))
        self.hyperparameters.clear()
        self.hyperparameters.update(hyper)
        if saved_gan is not None:
            self._gan.clear()
            self._gan.update(saved_gan)
        self._state, self._gan_state = state, gan_state
        self.skipped_steps = skipped

    def _checked_gan(self, saved: Any) -> tuple:
        """GAN's options and state from a state_dict's ``"gan"`` entry (host arrays)."""
        if (saved is None) != (self._gan is None):
            raise ValueError(f"the state_dict was saved with GAN {_on_off(saved)} but this one has "
                             f"it {_on_off(self._gan)}: make the optimizer with the same gan")
        if saved is None:
            return None, None
        _check_keys("state_dict['gan']", saved, ("options", "state"))
        options = _checked_saved_hyperparameters(GAN, saved["options"])
        _check_keys("GAN state", saved["state"], GAN.state_type._fields)
        count = _checked_count("GAN state.count", saved["state"]["count"], self._gan_state.count)
        extra = saved["state"]["extra"]
        if not isinstance(extra, tuple):
            raise TypeError(f"GAN state.extra is a {type(extra).__name__}, not a tuple")
        return options, GAN.state_type(count, extra)

    def _to_host(self, value: Any) -> Any:
        """``value`` with every array of the params' library replaced by a NumPy copy."""
        if array_api_compat.is_array_api_obj(value):
            return np.array(backends.get(self._library).to_numpy(value))
        return _map_containers(self._to_host, value)

    def _from_host(self, value: Any) -> Any:
        """``value`` with every NumPy array copied to the params' library and device."""
        if isinstance(value, np.ndarray):
            return backends.get(self._library).from_numpy(value, device=self._device)
        return _map_containers(self._from_host, value)

    def __repr__(self) -> str:
        gan = "" if self._gan is None else f", gan={self._gan!r}"
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return f"{type(self).__name__}({len(self.params)} {self._library} arrays{gan}, {hyper})"


def optimizer_class(rule: Rule | str, name: str | None = None) -> type[ArrayOptimizer]:
    """The :class:`ArrayOptimizer` subclass for ``rule`` (a :class:`Rule` or its name).

    Its signature and docstring show the rule's hyperparameters, their defaults and
    the rule's equations.
    """
    rule = rules[rule] if isinstance(rule, str) else rule
    if rule.kind != "optimizer":
        raise ValueError(f"{rule.name} is a gradient {rule.kind}, not an optimizer: put it in "
                         "front of one with its gan=... option")
    name = name or rule.class_name
    cls = type(name, (ArrayOptimizer,), {
        "rule": rule, "__doc__": _class_doc(rule), "__module__": __name__, "__qualname__": name})
    cls.__signature__ = _signature(rule)
    return cls


def _class_doc(rule: Rule) -> str:
    defaults = ", ".join(f"{k}={v!r}" for k, v in rule.defaults.items())
    return (f"{rule.title} ({rule.reference}) over a list of NumPy or CuPy arrays, updated in "
            f"place: see :class:`ArrayOptimizer`.\n\nHyperparameters and defaults: {defaults}.\n\n"
            f"Each step calls ``mvn_core.{rule.name}_update``:\n\n{rule.doc}\n")


def _signature(rule: Rule) -> inspect.Signature:
    P = inspect.Parameter
    fixed = [P("params", P.POSITIONAL_OR_KEYWORD), P("gan", P.KEYWORD_ONLY, default=False),
             P("state_dtype", P.KEYWORD_ONLY, default=None),
             P("fused", P.KEYWORD_ONLY, default=None),
             P("skip_nonfinite", P.KEYWORD_ONLY, default=False)]
    hyper = [P(k, P.KEYWORD_ONLY, default=v) for k, v in rule.defaults.items()]
    return inspect.Signature(fixed + hyper)


def _check_hyperparameters(rule: Rule, hyper: Mapping) -> None:
    """The rule's own check, which also names unknown hyperparameters (an update would
    only say that it got an unexpected keyword argument)."""
    rule.check_hyperparameters(**hyper)


def _checked_saved_hyperparameters(rule: Rule, saved: Any) -> dict:
    if not isinstance(saved, Mapping):
        raise TypeError(f"the saved {rule.name} hyperparameters are a {type(saved).__name__}, "
                        "not a dict")
    _check_hyperparameters(rule, saved)
    return {**rule.defaults, **saved}


def _checked_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _path_of(fused: Any, library: str) -> str:
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    if fused is False:
        return "pure"
    if library == "numpy":
        return "kernel-only" if fused else "kernel"
    return "cupy-kernel" if fused else "pure"


def _numpy_kernel_step(rule: Rule, state: Any, params: tuple, grads: list, hyper: dict) -> Any:
    """The generated CPU kernel over NumPy arrays, in place: the new state (the same
    buffers, the count advanced), or None where it cannot run (nothing written)."""
    import array_api_compat.numpy as xp

    from . import _cpu_kernel

    if _cpu_kernel.unavailable_reason() is not None:
        return None
    tensor_rule = rule.tensor_rule
    decays = tensor_rule.decays(hyper)
    buffer_lists = list(state[1:])
    new_count = next_count(xp, state.count)
    # A NumPy scalar (np.float32(0.5)) is taken as a 0-d gradient; its data pointer would
    # be a temporary's: hold it as an array.
    grads = [np.asarray(g) for g in grads]
    element, _ = _cpu_kernel.split_buffers(tensor_rule, buffer_lists)

    def takes(i):
        arrays = (params[i], grads[i], *(buffer_list[i] for buffer_list in element))
        return all(a.flags.c_contiguous for a in arrays)

    launches, rest = _cpu_kernel.plan(xp, tensor_rule, params, grads, buffer_lists, new_count,
                                      hyper, decays, takes)
    if rest:
        return None
    _cpu_kernel.run(xp, tensor_rule, launches, params, grads, buffer_lists, decays,
                    _address, _size)
    return type(state)(new_count, *buffer_lists)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _size(a: np.ndarray) -> int:
    return a.size


def _kernel_refusal(params: tuple) -> str:
    from . import _cpu_kernel

    return _cpu_kernel.unavailable_reason() or (
        "the generated kernel takes C-contiguous float16, float32 and float64 arrays "
        f"(here: {sorted({str(p.dtype) for p in params})}); leave fused unset to fall back "
        "to the pure rule")


def _refuse_one_array(params: Any) -> None:
    # The core takes one array too, but then the caller keeps no list to pass grads in.
    if array_api_compat.is_array_api_obj(params):
        raise TypeError("params is one array: pass a list of arrays, e.g. [params]")


def _library_of(params: tuple) -> str:
    """The name of the params' library (one of :data:`LIBRARIES`), or a clear refusal."""
    xp = array_api_compat.array_namespace(*params)
    for name in LIBRARIES:
        if getattr(array_api_compat, f"is_{name}_namespace")(xp):
            return name
    kind = type(params[0])
    raise TypeError(
        f"params are {kind.__module__}.{kind.__qualname__} arrays: this optimizer updates NumPy "
        "or CuPy arrays in place. Arrays that cannot be written (JAX) take the pure functions "
        "(mvn_core.<rule>_update and apply_updates) or their framework's adapter")


def _check_writable(params: tuple) -> None:
    """Refuse what ``p += u`` would not update in place, before anything is written."""
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        if isinstance(p, np.generic):
            raise TypeError(f"params[{i}] is a NumPy scalar ({type(p).__name__}), which cannot be "
                            "updated in place: pass a 0-d array, np.asarray(value)")
        if isinstance(p, np.ndarray) and not p.flags.writeable:
            raise ValueError(f"params[{i}] is a read-only NumPy array: it cannot be updated "
                             "in place")
        if not p.flags.c_contiguous and may_overlap_itself(p.shape, p.strides, p.itemsize):
            raise ValueError(f"params[{i}] has elements that share memory (strides "
                             f"{p.strides}: broadcast or as_strided?): each would be updated "
                             "more than once")
        if id(p) in seen:
            raise ValueError(f"params[{i}] is the same array as params[{seen[id(p)]}]: it would be "
                             "updated twice per step")
        seen[id(p)] = i


def _check_disjoint(params: tuple) -> None:
    """Refuse params whose memory overlaps (views of one buffer): an overlapping element
    would be updated once per view.  Memory extents are compared, sorted, once."""
    extents = sorted((*_extent(p), i) for i, p in enumerate(params) if p.size)
    for (_, end, i), (start, _, j) in zip(extents, extents[1:]):
        if start < end:
            raise ValueError(f"params[{min(i, j)}] and params[{max(i, j)}] share memory (views "
                             "of one array?): each element would be updated more than once")


def _extent(a: Any) -> tuple[int, int]:
    """The first and one-past-last byte address an array may touch."""
    if isinstance(a, np.ndarray):
        low, high = np.lib.array_utils.byte_bounds(a)
        return low, high
    first = a.data.ptr  # CuPy: the extent spanned by the strides from the first element
    span = sum((n - 1) * s for n, s in zip(a.shape, a.strides))
    return min(first, first + span), max(first, first + span) + a.itemsize


def _check_keys(label: str, value: Any, keys: tuple, optional: tuple = ()) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{label} is a {type(value).__name__}, not a dict")
    if not set(keys) <= set(value) <= set(keys) | set(optional):
        raise ValueError(f"{label} has the keys {sorted(value)}, expected {sorted(keys)}")


def _checked_state(label: str, saved: Any, current: Any) -> Any:
    """``saved`` (a dict of host arrays) as a state like ``current``: same fields, and
    as many arrays per field as it has, each of the same shape and dtype."""
    _check_keys(label, saved, current._fields)
    fields = {"count": _checked_count(f"{label}.count", saved["count"], current.count)}
    for name in current._fields[1:]:
        buffer_list, now = saved[name], getattr(current, name)
        if not isinstance(buffer_list, (list, tuple)) or len(buffer_list) != len(now):
            held = (len(buffer_list) if isinstance(buffer_list, (list, tuple))
                    else type(buffer_list).__name__)
            raise ValueError(f"{label}.{name} holds {held} arrays but this one has {len(now)} "
                             "(one per param): the state was saved for other parameters")
        fields[name] = tuple(_checked_array(f"{label}.{name}[{i}]", a, b)
                             for i, (a, b) in enumerate(zip(buffer_list, now)))
    return type(current)(**fields)


def _checked_array(label: str, saved: Any, current: Any) -> np.ndarray:
    if not isinstance(saved, np.ndarray):
        raise TypeError(f"{label} is a {type(saved).__name__}, not a NumPy array "
                        "(state_dict() saves NumPy arrays)")
    if saved.shape != tuple(current.shape):
        raise ValueError(f"{label} has shape {saved.shape} but this optimizer's has shape "
                         f"{tuple(current.shape)}: the state was saved for other parameters")
    if saved.dtype != current.dtype:
        raise TypeError(f"{label} has dtype {saved.dtype} but this optimizer keeps "
                        f"{current.dtype} (params and state_dtype must be those of the saved one)")
    return saved


def _checked_count(label: str, saved: Any, current: Any) -> np.ndarray:
    saved = _checked_array(label, saved, current)
    if not 0 <= int(saved) <= COUNT_MAX:
        raise ValueError(f"{label} is {int(saved)}: a step count lies in [0, 2**31 - 1]")
    return saved


def _map_containers(fn: Any, value: Any) -> Any:
    """``fn`` applied to each item of a dict, list, tuple or NamedTuple (its type kept)."""
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(fn(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(fn(v) for v in value)
    return value


def _on_off(value: Any) -> str:
    return "off" if value is None else "on"


OPTIMIZERS: Mapping[str, type[ArrayOptimizer]] = MappingProxyType(
    {name: optimizer_class(rule) for name, rule in rules.items() if rule.kind == "optimizer"})

__all__ = ["ArrayOptimizer", "optimizer_class", "OPTIMIZERS", "LIBRARIES"]
for _cls in OPTIMIZERS.values():  # MVNGrad, Adam, ...: every registered optimizer
    globals()[_cls.__name__] = _cls
    __all__.append(_cls.__name__)
del _cls
