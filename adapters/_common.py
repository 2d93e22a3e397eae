"""What the adapters share: reading the ``gan=`` option of an optimizer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mvn_core import rules

GAN = rules["gan"]


def gan_options(option: Any) -> dict | None:
    """GAN's options from an optimizer's ``gan=``: None when off (``False``), else the
    options (``True``: the defaults; a dict: those options), checked as GAN checks them."""
    if option is False or option is None:
        return None
    if option is True:
        option = {}
    if not isinstance(option, Mapping):
        raise TypeError(f"gan must be False, True or a dict of GAN's options "
                        f"({', '.join(GAN.defaults)}), got a {type(option).__name__}")
    GAN.check_hyperparameters(**option)
    return {**GAN.defaults, **option}
