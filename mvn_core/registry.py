"""The registry of rules, from which adapters and the conformance suite are generated."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from . import adabelief, adam, gan, laprop, maxva, mvn, novograd, sgd
from ._rule import TensorRule


@dataclass(frozen=True)
class Rule:
    """One rule: its functions, state type, default hyperparameters and documentation.

    ``kind`` is ``"optimizer"`` for a rule whose update returns parameter updates and
    ``"transform"`` for one that returns transformed gradients (GAN).  ``per_coordinate``
    says whether each coordinate's step depends on that coordinate alone (so that a
    rule may run on any slice of a tensor, e.g. one shard); ``tensor_rule`` holds the
    per-tensor mathematics that fast paths execute (None for GAN).
    """

    name: str
    title: str
    class_name: str  # of the adapters' optimizer classes (the papers' and torch's names)
    init: Callable
    update: Callable
    state_type: type
    kind: str
    per_coordinate: bool
    reference: str
    tensor_rule: TensorRule | None
    defaults: Mapping[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.update).parameters.values()
        defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        object.__setattr__(self, "defaults", MappingProxyType(defaults))

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
        if self.tensor_rule is None:
            gan.check_options(full["center"], full["scale"])
        else:
            self.tensor_rule.checked_hyperparameters(full)


def _rule(module, name, title, class_name, reference, kind="optimizer", per_coordinate=True,
          tensor_rule=None, state_type=None):
    return Rule(
        name=name, title=title, class_name=class_name, init=getattr(module, f"{name}_init"),
        update=getattr(module, f"{name}_update"), state_type=state_type or tensor_rule.state_type,
        kind=kind, per_coordinate=per_coordinate, reference=reference, tensor_rule=tensor_rule)


rules: Mapping[str, Rule] = MappingProxyType({r.name: r for r in (
    _rule(mvn, "mvn", "MVN-Grad", "MVNGrad", "Patitucci & Mokhtari, arXiv 2602.10204 (2026)",
          tensor_rule=mvn.MVN),
    _rule(gan, "gan", "Gradient Autoscaled Normalization", "GAN",
          "Yun, arXiv 2509.03677 (2025)", kind="transform", per_coordinate=False,
          state_type=gan.GANState),
    _rule(maxva, "maxva", "MaxVA", "MaxVA", "Zhu et al., arXiv 2006.11918 (2020)",
          tensor_rule=maxva.MAXVA),
    _rule(novograd, "novograd", "NovoGrad", "NovoGrad", "Ginsburg et al., arXiv 1905.11286 (2019)",
          per_coordinate=False, tensor_rule=novograd.NOVOGRAD),
    _rule(adam, "adam", "Adam / AdamW", "Adam", "Kingma & Ba, arXiv 1412.6980 (2014)",
          tensor_rule=adam.ADAM),
    _rule(adabelief, "adabelief", "AdaBelief", "AdaBelief",
          "Zhuang et al., arXiv 2010.07468 (2020)", tensor_rule=adabelief.ADABELIEF),
    _rule(laprop, "laprop", "LaProp", "LaProp", "Ziyin et al., arXiv 2002.04839 (2020)",
          tensor_rule=laprop.LAPROP),
    _rule(sgd, "sgd", "SGD with momentum", "SGD", "torch.optim.SGD semantics",
          tensor_rule=sgd.SGD),
)})
