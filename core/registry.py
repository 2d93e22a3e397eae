"""The registry of rules, from which adapters, kernels and the conformance suite are
generated.

Every :class:`~mvn_core.rule.Rule` defined at the top level of a module of this
package is registered, in the order of its ``order`` (then its name): adding a rule is
adding its module.  A rule defined elsewhere (a user's, with
:func:`mvn_core.define_rule`) is not registered; the adapters take it all the same.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping

from .rule import Rule

_NOT_RULES = ("cli", "registry", "rule")  # modules of this package that hold no rule


def _discovered() -> list[Rule]:
    package = __name__.rpartition(".")[0]
    found: dict[int, Rule] = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.ispkg or info.name.startswith("_") or info.name in _NOT_RULES:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        found.update((id(v), v) for v in vars(module).values() if isinstance(v, Rule))
    return sorted(found.values(), key=lambda rule: (rule.order, rule.name))


def _registered(found: list[Rule]) -> dict[str, Rule]:
    out: dict[str, Rule] = {}
    for rule in found:
        if rule.name in out:
            raise ValueError(f"two rules are called {rule.name!r}")
        out[rule.name] = rule
    return out


_RULES: dict[str, Rule] = _registered(_discovered())
rules: Mapping[str, Rule] = MappingProxyType(_RULES)


@contextlib.contextmanager
def including(extra: Iterable[Rule]) -> Iterator[Mapping[str, Rule]]:
    """Register ``extra`` rules (a user's, made with :func:`mvn_core.define_rule`) for
    the duration of the block, after the package's own, so that what enumerates the
    registry (the conformance check, ``mvn-core check --rules-from``) takes them too.
    A name that is taken is refused."""
    extra = list(extra)
    taken = sorted({r.name for r in extra} & set(_RULES))
    if taken or len({r.name for r in extra}) != len(extra):
        raise ValueError(f"rules called {taken or [r.name for r in extra]} are registered "
                         "already (or named twice): give them other names")
    _RULES.update((r.name, r) for r in extra)
    try:
        yield rules
    finally:
        for rule in extra:
            del _RULES[rule.name]
