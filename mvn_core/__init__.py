"""mvn-core: optimizer update rules written once against the Python Array API standard.

Every rule ``r`` in ``mvn, gan, maxva, novograd, adam, adabelief, laprop, sgd`` is a pair
of pure functions::

    state = mvn_core.r_init(params, *, state_dtype=None)
    updates, state = mvn_core.r_update(state, grads, params=None, **hyperparameters)
    params = mvn_core.apply_updates(params, updates)

``params``/``grads`` are one array or a flat list/tuple of arrays of any Array-API
namespace (NumPy, PyTorch, JAX, CuPy, array-api-strict, ...).  Nothing is mutated.
This package imports no array library: the namespace comes from the arrays passed in.

The functions are differentiable wherever the library is: on PyTorch params that
require grad, take a training step under ``torch.no_grad()`` (coupled weight decay
would otherwise keep every step's autograd graph alive through the state).
``skip_if_nonfinite(update)`` makes an update skip the steps whose gradients hold a
NaN or an Inf.
"""

from ._nonfinite import all_finite, skip_if_nonfinite
from ._rule import apply_updates
from .adabelief import AdaBeliefState, adabelief_init, adabelief_update
from .adam import AdamState, adam_init, adam_update
from .gan import GANState, gan_init, gan_update
from .laprop import LaPropState, laprop_init, laprop_update
from .maxva import MaxVAState, maxva_init, maxva_update
from .mvn import MVNState, mvn_init, mvn_update
from .novograd import NovoGradState, novograd_init, novograd_update
from .registry import Rule, rules
from .sgd import SGDState, sgd_init, sgd_update

__version__ = "0.1.0"

__all__ = [
    "apply_updates", "rules", "Rule", "skip_if_nonfinite", "all_finite",
    "mvn_init", "mvn_update", "MVNState",
    "gan_init", "gan_update", "GANState",
    "maxva_init", "maxva_update", "MaxVAState",
    "novograd_init", "novograd_update", "NovoGradState",
    "adam_init", "adam_update", "AdamState",
    "adabelief_init", "adabelief_update", "AdaBeliefState",
    "laprop_init", "laprop_update", "LaPropState",
    "sgd_init", "sgd_update", "SGDState",
]
