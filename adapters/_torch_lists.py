"""Lists of tensors as one array, for running a rule's pure per-tensor mathematics over
many tensors at once with PyTorch's multi-tensor (``torch._foreach_*``) kernels.

A :class:`TensorList` stands for a batch of same-dtype tensors; its operators and the
functions of :data:`namespace` apply elementwise to each tensor, as the Array API would
to each one alone.  A rule's ``direction`` function, written against the standard, runs
unchanged on it: the fast path is the pure rule executed on another array type, not a
rewrite of it.  Each operation rounds exactly as the same operation on one tensor, so
the results are bit for bit those of the per-tensor path.
"""

from __future__ import annotations

import torch

from ._common import Subset


class TensorList:
    """Same-dtype tensors on one device, treated as one array (elementwise, per tensor)."""

    __slots__ = ("tensors",)

    def __init__(self, tensors):
        self.tensors = list(tensors)

    @property
    def dtype(self):
        return self.tensors[0].dtype

    def __len__(self):
        return len(self.tensors)

    def __add__(self, other):
        return _binary(torch._foreach_add, self, other)

    __radd__ = __add__

    def __mul__(self, other):
        return _binary(torch._foreach_mul, self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        if isinstance(other, TensorList):
            return _binary(torch._foreach_div, self, other)
        # By a scalar, CUDA's multi-tensor kernel multiplies by its reciprocal, which
        # rounds differently from ``t / s``: divide tensor by tensor instead.
        return _each(torch.div, self, other)

    def __rtruediv__(self, other):
        return TensorList(other / t for t in self.tensors)

    def __sub__(self, other):
        if isinstance(other, torch.Tensor):  # no Tensor overload: add the negation
            return _binary(torch._foreach_add, self, -other)
        return _binary(torch._foreach_sub, self, other)

    def __rsub__(self, other):  # other - x == (-x) + other, exactly
        return TensorList(torch._foreach_neg(self.tensors)) + other

    def __neg__(self):
        return TensorList(torch._foreach_neg(self.tensors))

    def __gt__(self, other):
        return _each(torch.gt, self, other)

    def __lt__(self, other):
        return _each(torch.lt, self, other)

    def __ge__(self, other):
        return _each(torch.ge, self, other)

    def __le__(self, other):
        return _each(torch.le, self, other)

    def __eq__(self, other):  # elementwise, as for arrays
        return _each(torch.eq, self, other)

    def __ne__(self, other):
        return _each(torch.ne, self, other)

    __hash__ = None

    def __bool__(self):
        raise TypeError("the truth value of a TensorList is ambiguous: a rule must not "
                        "branch on array values")

    def __or__(self, other):
        return _each(torch.logical_or, self, other)

    __ror__ = __or__

    def __and__(self, other):
        return _each(torch.logical_and, self, other)

    __rand__ = __and__

    def __invert__(self):
        return TensorList(torch.logical_not(t) for t in self.tensors)


def _tensors(value, n):
    return value.tensors if isinstance(value, TensorList) else [value] * n


def _binary(foreach, a, b):
    """``foreach`` on a list and a list, a 0-d tensor or a Python number."""
    return TensorList(foreach(a.tensors, b.tensors if isinstance(b, TensorList) else b))


def _each(fn, *args, **kwargs):
    """``fn`` tensor by tensor (for operations without a multi-tensor kernel)."""
    n = next(len(a) for a in args if isinstance(a, TensorList))
    per_argument = [_tensors(a, n) for a in args]
    return TensorList(fn(*row, **kwargs) for row in zip(*per_argument))


def _sqrt(x):
    return TensorList(torch._foreach_sqrt(x.tensors))


def _sign(x):
    # torch.sign gives 0 for NaN; the standard (and the pure path, through
    # array-api-compat) gives NaN
    signs = torch._foreach_sign(x.tensors)
    return TensorList(torch.where(torch.isnan(t), t, s) for t, s in zip(x.tensors, signs))


def _where(condition, a, b):
    return _each(torch.where, condition, a, b)


def _clip(x, min=None, max=None):
    out = x.tensors
    for bound, foreach, each in ((min, torch._foreach_clamp_min, "min"),
                                 (max, torch._foreach_clamp_max, "max")):
        if bound is None:
            continue
        if isinstance(bound, torch.Tensor):  # a 0-d tensor bound: tensor by tensor
            out = [torch.clamp(t, **{each: bound}) for t in out]
        else:
            out = foreach(out, bound)
    return TensorList(out)


def _astype(x, dtype, copy=True):
    if x.dtype == dtype and not copy:
        return x
    return TensorList(t.to(dtype, copy=copy) for t in x.tensors)


# The Array-API subset a rule's per-tensor mathematics may use on lists of tensors: the
# operators of :class:`TensorList` and these functions.
namespace = Subset(
    __name__="mvn_core.adapters._torch_lists",
    sqrt=_sqrt,
    sign=_sign,
    where=_where,
    clip=_clip,
    astype=_astype,
    isfinite=lambda x: _each(torch.isfinite, x),
    sum=lambda x: _each(torch.sum, x),
    ones_like=lambda x: TensorList(torch.ones_like(t) for t in x.tensors),
    zeros_like=lambda x: TensorList(torch.zeros_like(t) for t in x.tensors),
)
