"""mvn-core: optimizer update rules written once against the Python Array API standard.

Every rule ``r`` of :data:`rules` (``mvn``, ``gan``, ``maxva``, ``novograd``, ``adam``,
``adabelief``, ``laprop``, ``sgd``, ...) is a pair of pure functions::

    state = mvn_core.r_init(params, *, state_dtype=None)
    updates, state = mvn_core.r_update(state, grads, params=None, **hyperparameters)
    params = mvn_core.apply_updates(params, updates)

``params``/``grads`` are one array or a flat list/tuple of arrays of any Array-API
namespace (NumPy, PyTorch, JAX, CuPy, array-api-strict, ...).  Nothing is mutated.
This package imports no array library: the namespace comes from the arrays passed in.
A new rule is one declaration, :func:`define_rule` (see :mod:`mvn_core.rule`).

The functions are differentiable wherever the library is: on PyTorch params that
require grad, take a training step under ``torch.no_grad()`` (coupled weight decay
would otherwise keep every step's autograd graph alive through the state).
``skip_if_nonfinite(update)`` makes an update skip the steps whose gradients hold a
NaN or an Inf.
"""

from ._nonfinite import all_finite, skip_if_nonfinite
from ._rule import apply_updates, bias_corrections, guard, one_minus_power
from .registry import rules
from .rule import Hyperparameter, Rule, define_rule

__version__ = "0.1.0"

__all__ = ["apply_updates", "rules", "Rule", "Hyperparameter", "define_rule",
           "skip_if_nonfinite", "all_finite", "bias_corrections", "one_minus_power", "guard"]

# Each registered rule's functions and state type: <name>_init, <name>_update, <State>.
for _rule in rules.values():
    for _export in (_rule.init, _rule.update, _rule.state_type):
        globals()[_export.__name__] = _export
        __all__.append(_export.__name__)
del _rule, _export
