"""Helpers shared by the backend modules."""

from __future__ import annotations

import importlib
import importlib.util


def missing(module: str, extra: str | None = None, install: str | None = None) -> str | None:
    """None if ``module`` can be imported, else the reason and how to install it: the
    extra of mvn-core that brings it, or ``install`` (what to give pip) for a library
    that no extra brings."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install {install or repr(f'mvn-core[{extra}]')})"
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken install is reported, not raised
        return f"{module} fails to import: {error}"
    return None


def pick_dtypes(lib, names) -> dict:
    """The dtypes called ``names`` that ``lib`` defines."""
    return {name: getattr(lib, name) for name in names if hasattr(lib, name)}
