"""What the adapters share: reading the ``gan=`` option of an optimizer, checking
hyperparameters with the learning rate under the framework's name for it, and telling
an array that cannot be updated in place because its elements share memory."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from mvn_core import Rule, rules

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


class Subset(SimpleNamespace):
    """A stand-in Array-API namespace: the functions it has are the subset of the
    standard it implements; asked for another, it raises an error that names it and
    lists the subset, instead of a bare AttributeError."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        known = ", ".join(n for n in vars(self) if not n.startswith("_"))
        raise AttributeError(f"{name} is not in the Array-API subset that {self.__name__} "
                             f"implements ({known})")


def check_with_learning_rate(rule: Rule, hyper: Mapping, learning_rate: Any = None) -> None:
    """The rule's check of ``hyper`` and of ``learning_rate`` (unless None or a schedule,
    i.e. callable), refused in the name ``learning_rate`` that Keras and optax give it
    (the core's name for it is ``lr``)."""
    rate = {} if learning_rate is None or callable(learning_rate) else {"lr": learning_rate}
    try:
        rule.check_hyperparameters(**rate, **hyper)
    except (TypeError, ValueError) as error:
        message = str(error)
        if not message.startswith("lr"):
            raise
        raise type(error)("learning_rate" + message[len("lr"):]) from None


def may_overlap_itself(shape: tuple, strides: tuple, itemsize: int = 1) -> bool:
    """Whether two elements of an array of ``shape`` and ``strides`` may share memory
    (a stride of 0 from broadcasting, or ``as_strided``), so that an in-place update
    would write some of them twice.  ``strides`` and ``itemsize`` in one unit (bytes
    for NumPy and CuPy, elements for PyTorch, whose ``itemsize`` is then 1).

    Sufficient for no overlap, and what every ordinary layout (contiguous, transposed,
    sliced) meets: with the axes of more than one element sorted by ``|stride|``, each
    stride is larger than the span of the axes before it.  An exotic interleaved layout
    that fails it without overlapping is refused too."""
    if any(n == 0 for n in shape):
        return False
    span = itemsize
    for n, stride in sorted(((n, abs(s)) for n, s in zip(shape, strides) if n > 1),
                            key=lambda axis: axis[1]):
        if stride < span:
            return True
        span = stride * (n - 1) + span
    return False
