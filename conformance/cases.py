"""The hyperparameter settings every rule is checked with.

Three settings per rule (two for LaProp): the defaults, weight decay, and the option
that changes the rule's equations most (coupled decay, rectification, a narrow MaxVA
clip, NovoGrad's gradient averaging, Nesterov; GAN's centring and scale).  The
learning rate is raised from the defaults (1e-2; LaProp 4e-3) so that a few dozen
steps visibly move the parameters and the rounding of the updates is exercised.
"""

from __future__ import annotations

from typing import NamedTuple

WD = 0.1
SETTINGS = {
    "mvn": [{}, {"weight_decay": WD}, {"weight_decay": WD, "coupled_weight_decay": True}],
    "adam": [{}, {"weight_decay": WD}, {"weight_decay": WD, "coupled_weight_decay": True}],
    "adabelief": [{}, {"weight_decay": WD}, {"weight_decay": WD, "rectify": True}],
    "laprop": [{}, {"weight_decay": WD}],
    "maxva": [{}, {"weight_decay": WD}, {"b2_min": 0.9, "b2_max": 0.99}],
    "novograd": [{}, {"weight_decay": WD}, {"weight_decay": WD, "grad_averaging": True}],
    "sgd": [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": WD},
            {"momentum": 0.9, "weight_decay": WD, "coupled_weight_decay": True}],
    "gan": [{}, {"center": "channel"}, {"scale": "none"}],
}
LR = {"laprop": 4e-3, "gan": None}  # None: GAN has no learning rate; others 1e-2
RULES = tuple(SETTINGS)


class Case(NamedTuple):
    """One rule with one setting: ``hyper`` is what the rule's update is called with
    (the learning rate included), ``label`` names the setting (without it)."""

    rule: str
    label: str
    hyper: dict

    @property
    def id(self) -> str:
        return f"{self.rule}[{self.label}]"


def cases(rules=None) -> list[Case]:
    """Every setting of every rule (or of ``rules``), in the order of :data:`SETTINGS`."""
    unknown = sorted(set(rules or ()) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown rules {unknown}; known: {', '.join(SETTINGS)}")
    return [_case(rule, setting) for rule, settings in SETTINGS.items()
            if rules is None or rule in rules for setting in settings]


def _case(rule: str, setting: dict) -> Case:
    lr = LR.get(rule, 1e-2)
    hyper = dict(setting) if lr is None else dict(setting, lr=lr)
    label = ",".join(f"{k}={v}" for k, v in setting.items()) or "defaults"
    return Case(rule, label, hyper)
