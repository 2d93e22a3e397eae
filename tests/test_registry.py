"""The registry: every rule, its functions, and docs/algorithms.md's defaults."""

from __future__ import annotations

import numpy as np
import pytest

import mvn_core
from mvn_core.conformance import oracle

NAMES = tuple(mvn_core.rules)


def test_every_rule_is_registered_with_its_public_functions():
    assert set(NAMES) == set(oracle.ENTRIES) and NAMES[:2] == ("mvn", "gan")  # the flagship first
    assert [r.order for r in mvn_core.rules.values()] == sorted(
        r.order for r in mvn_core.rules.values())
    for name, rule in mvn_core.rules.items():
        entry = oracle.ENTRIES[name]  # every rule has its reference
        assert rule.name == name
        assert rule.init is getattr(mvn_core, f"{name}_init")
        assert rule.update is getattr(mvn_core, f"{name}_update")
        assert rule.state_type is getattr(mvn_core, rule.state_type.__name__)
        assert type(rule.init([np.ones(2)])) is rule.state_type
        assert rule.kind == ("transform" if entry.transform else "optimizer")
        assert rule.class_name.isidentifier()
        assert (rule.tensor_rule is None) == (rule.kind == "transform")


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_those_of_algorithms_md(name):
    # oracle.DEFAULTS is restated from docs/algorithms.md independently of the core
    assert dict(mvn_core.rules[name].defaults) == oracle.DEFAULTS[name]


@pytest.mark.parametrize("name", NAMES)
def test_every_rule_documents_its_mathematics(name):
    doc = mvn_core.rules[name].doc
    assert "Returns" in doc and "::" in doc  # the equations as a literal block


def test_per_coordinate_flags_and_buffers_agree_with_the_oracle():
    """A rule is per coordinate when no value of its step is one per tensor: no buffer
    (the oracle's restatement) and no statistic."""
    for name, rule in mvn_core.rules.items():
        entry = oracle.ENTRIES[name]
        if rule.tensor_rule is None:
            assert not rule.per_coordinate
            continue
        tensor_rule = rule.tensor_rule
        assert set(tensor_rule.buffer_names) == set(entry.buffers) | set(entry.tensor_buffers)
        assert tensor_rule.scalar_buffers == set(entry.tensor_buffers)
        assert rule.per_coordinate == (not entry.tensor_buffers
                                       and tensor_rule.statistic is None)
    assert not mvn_core.rules["novograd"].per_coordinate and mvn_core.rules["mvn"].per_coordinate


def test_registry_is_read_only():
    with pytest.raises(TypeError):
        mvn_core.rules["mine"] = mvn_core.rules["adam"]
    with pytest.raises(TypeError):
        mvn_core.rules["adam"].defaults["lr"] = 1.0


def test_check_hyperparameters_raises_what_an_update_would():
    adam = mvn_core.rules["adam"]
    adam.check_hyperparameters(lr=0.1, b1=0.5)
    with pytest.raises(ValueError, match="b1=1.0 is out of range"):
        adam.check_hyperparameters(b1=1.0)
    with pytest.raises(TypeError, match="adam has no hyperparameter 'momentum'"):
        adam.check_hyperparameters(momentum=0.9)
    with pytest.raises(ValueError, match="b2_min=0.9 is larger"):
        mvn_core.rules["maxva"].check_hyperparameters(b2_min=0.9, b2_max=0.5)
    with pytest.raises(ValueError, match="center="):
        mvn_core.rules["gan"].check_hyperparameters(center="rows")
