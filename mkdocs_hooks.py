"""Hooks of the documentation build (mkdocs.yml, ``hooks``).

mkdocstrings imports the package to document it (the rules' functions and the adapters'
classes are generated at import), and griffe, its loader, imports every submodule on
the way.  None of the pages documents a TensorFlow module, so the build keeps
TensorFlow out: its import takes seconds, and an LLVM that TensorFlow has loaded aborts
the process when Triton, which PyTorch imports, loads its own.  Keras, whose adapter is
documented, runs on its NumPy backend here, which imports in a moment.
"""

from __future__ import annotations

import os
import sys


def on_startup(command, dirty):
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    sys.modules.setdefault("tensorflow", None)  # import tensorflow raises ImportError


RULES_TABLE = "<!-- the rules table, generated from the registry -->"


def on_page_markdown(markdown, page, config, files):
    """A page's ``RULES_TABLE`` marker becomes the table of the registered rules, so
    that a new rule is listed without anyone writing it here."""
    return markdown.replace(RULES_TABLE, rules_table()) if RULES_TABLE in markdown else markdown


def rules_table() -> str:
    import mvn_core

    rows = ["| rule | function | reference | defaults |", "| --- | --- | --- | --- |"]
    for rule in mvn_core.rules.values():
        defaults = ", ".join(f"{name}={value!r}" for name, value in rule.defaults.items())
        rows.append(f"| {rule.title} | `{rule.update.__name__}` | {rule.reference} | "
                    f"`{defaults}` |")
    return "\n".join(rows)


try:  # the griffe extension below is loaded by mkdocstrings (mkdocs.yml, extensions)
    import griffe
except ImportError:  # pragma: no cover
    griffe = None

if griffe is not None:

    class HideSpecialMembers(griffe.Extension):
        """Inspected classes list their special attributes (``__doc__``, ``__module__``,
        ``__signature__``, ...) as members; the site documents none of them.  Public
        members are those of the modules' ``__all__`` (mkdocs.yml: ``filters: public``)."""

        def on_class_members(self, *, cls, **kwargs):
            for name in [name for name, member in cls.members.items()
                         if member.is_special and name != "__init__"]:
                cls.del_member(name)
