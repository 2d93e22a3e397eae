"""The hyperparameter settings every rule is checked with: the ones it declares
(``Rule.settings``: typically the defaults, weight decay, and the option that changes
its equations most), each with a learning rate ten times the rule's default (1e-2 for
most, LaProp 4e-3) so that a few dozen steps visibly move the parameters and the
rounding of the updates is exercised.
"""

from __future__ import annotations

from typing import NamedTuple

import mvn_core

LR_FACTOR = 10  # the checked learning rate over the rule's default


def rule_names() -> tuple[str, ...]:
    """The registered rules' names (those of ``mvn-core check --rules-from`` included)."""
    return tuple(mvn_core.rules)


def settings(rule: mvn_core.Rule) -> tuple:
    """The settings ``rule`` is checked with: those it declares, or the defaults alone."""
    return rule.settings or ({},)


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
    """Every setting of every rule (or of ``rules``), in the registry's order."""
    unknown = sorted(set(rules or ()) - set(rule_names()))
    if unknown:
        raise ValueError(f"unknown rules {unknown}; known: {', '.join(rule_names())}")
    return [_case(rule, setting) for rule in mvn_core.rules.values()
            if rules is None or rule.name in rules for setting in settings(rule)]


def _case(rule: mvn_core.Rule, setting: dict) -> Case:
    hyper = dict(setting)
    if "lr" in rule.defaults:
        hyper.setdefault("lr", LR_FACTOR * rule.defaults["lr"])
    label = ",".join(f"{k}={v}" for k, v in setting.items()) or "defaults"
    return Case(rule.name, label, hyper)
