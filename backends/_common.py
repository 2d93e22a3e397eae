"""Helpers shared by the backend modules."""

from __future__ import annotations

import importlib
import importlib.util


def missing(module: str, extra: str) -> str | None:
    """None if ``module`` can be imported, else the reason and how to install it."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install 'mvn-core[{extra}]')"
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken install is reported, not raised
        return f"{module} fails to import: {error}"
    return None


def pick_dtypes(lib, names) -> dict:
    """The dtypes called ``names`` that ``lib`` defines."""
    return {name: getattr(lib, name) for name in names if hasattr(lib, name)}
