"""TensorFlow: its logical devices (CPU, GPU); compile hook ``tf.function``.

TensorFlow has no Array-API namespace of its own: :mod:`.tensorflow_namespace` wraps its
tensors in one that implements the part of the standard the rules use.  The arrays of
this backend are therefore that namespace's ``Array`` objects (``x.tensor`` is the
``tf.Tensor``).  Not in :data:`mvn_core.backends.NAMES`: the conformance matrix and the
tests run whole-standard namespaces there, and ``mvn-core check --namespace
mvn_core.backends.tensorflow_namespace`` checks this one.
"""

from __future__ import annotations

from ._common import missing, pick_dtypes

NAME = "tensorflow"


def unavailable_reason():
    return missing("tensorflow", install="tensorflow")


def namespace():
    from . import tensorflow_namespace

    return tensorflow_namespace


def devices():
    """CPU devices first, then the accelerators (the names ``tf.device`` takes)."""
    info = namespace().__array_namespace_info__()
    return sorted(info.devices(), key=lambda name: not name.startswith("CPU"))


def default_device():
    return devices()[0]


def from_numpy(array, device=None, dtype=None):
    xp = namespace()
    dtype = getattr(xp, dtype) if isinstance(dtype, str) else dtype
    return xp.asarray(array, dtype=dtype, device=device or default_device(), copy=True)


def to_numpy(x):
    xp = namespace()
    if x.dtype == xp.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
        x = xp.astype(x, xp.float32)
    return x.tensor.numpy()


def dtypes(device=None):
    return pick_dtypes(namespace(), ("float16", "bfloat16", "float32", "float64"))


def compile(fn):
    """``fn`` under ``tf.function``: the arrays of its arguments and results (in lists,
    tuples, NamedTuples and dicts) cross the boundary as tensors."""
    import tensorflow as tf

    xp = namespace()

    def tensors(tree):
        return tf.nest.map_structure(lambda a: a.tensor if isinstance(a, xp.Array) else a, tree)

    def arrays(tree):
        return tf.nest.map_structure(lambda t: xp.Array(t) if tf.is_tensor(t) else t, tree)

    traced = tf.function(lambda *args: tensors(fn(*arrays(args))), autograph=False)
    return lambda *args: arrays(traced(*tensors(args)))


def synchronize(x=None):
    if x is not None:  # a result is ready once its value can be read
        namespace().asarray(x).tensor.numpy()
    return x
