"""The Keras half of ``tests/test_adapter_keras.py``: run in a process of its own with
``KERAS_BACKEND`` set (Keras chooses its backend when it is imported).

Every optimizer of :mod:`mvn_core.adapters.keras` against the pure rule on the same
backend's arrays, fed the same float32 gradients: through ``optimizer.apply`` (eager),
and through ``model.fit`` (compiled by the backend: ``jax.jit``, ``tf.function``; eager
on PyTorch) with a learning-rate schedule, ``exclude_from_weight_decay``, GAN,
``clipnorm``, ``global_clipnorm``, ``gradient_accumulation_steps`` and ``use_ema``;
then ``get_config``/``from_config``, the state's variables and dtypes, ``model.save``
and ``keras.models.load_model`` with a resumed run, and a short real training.
Prints one JSON line: per check, the largest difference from its reference and the
facts the tests assert on.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import keras
import numpy as np

import mvn_core
from mvn_core.adapters import keras as adapter

BACKEND = keras.backend.backend()
GAN = mvn_core.rules["gan"]
# The model's variables, by name: a matrix, a vector, a scale and a 4-d (convolution) kernel.
SHAPES = {"kernel": (5, 4), "bias": (4,), "scale": (), "conv": (2, 3, 2, 3)}
SIZES = {name: int(np.prod(shape)) for name, shape in SHAPES.items()}
STEPS = 6
LR = 1e-2
RNG = np.random.default_rng(0)
INIT = {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
GRADS = [{name: RNG.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
         for _ in range(STEPS)]


# --- the pure rule, on this backend's arrays ------------------------------------------------------

def core_array(values, dtype="float32"):
    """NumPy values as this backend's array, as Keras makes them (TensorFlow's wrapped in
    its namespace), for the pure rule."""
    tensor = keras.ops.convert_to_tensor(np.asarray(values), dtype=dtype)
    if BACKEND == "tensorflow":
        from mvn_core.backends import tensorflow_namespace

        return tensorflow_namespace.asarray(tensor)
    return tensor


def to_numpy(array):
    return keras.ops.convert_to_numpy(keras.ops.cast(getattr(array, "tensor", array), "float32"))


def pure(rule_name, grads, *, rates, names=tuple(SHAPES), gan=None, **hyper):
    """The parameters ``names`` after each step of the pure rule, fed ``grads`` (a list of
    dicts of NumPy arrays), with the learning rate of step t ``rates[t]`` as a float32
    0-d array (what Keras hands the optimizer)."""
    rule = mvn_core.rules[rule_name]
    params = [core_array(INIT[n]) for n in names]
    state = rule.init(params)
    gan_state = GAN.init(params)
    out = []
    for step, rate in zip(grads, rates):
        g = [core_array(step[n]) for n in names]
        if gan is not None:
            g, gan_state = GAN.update(gan_state, g, **gan)
        lr = core_array(rate)
        updates, state = rule.update(state, g, params, lr=lr, **hyper)
        params = mvn_core.apply_updates(params, updates)
        out.append({n: to_numpy(p) for n, p in zip(names, params)})
    return out


def difference(got, expected) -> float:
    """The largest |difference| over every step and variable (trajectories of dicts)."""
    return max(float(np.max(np.abs(np.asarray(g[n], np.float64) - np.asarray(e[n], np.float64)),
                            initial=0.0))
               for g_step, e_step in zip(got, expected) for g, e in [(g_step, e_step)]
               for n in e)


# --- Keras: optimizer.apply, and a model whose gradients are its inputs ------------------------

def keras_apply(optimizer, grads):
    """The variables after each ``optimizer.apply`` (eager), fed ``grads``."""
    variables = [keras.Variable(INIT[n], name=n) for n in SHAPES]
    out = []
    for step in grads:
        optimizer.apply([keras.ops.convert_to_tensor(step[n]) for n in SHAPES], variables)
        out.append({n: keras.ops.convert_to_numpy(v) for n, v in zip(SHAPES, variables)})
    return out


class Feed(keras.layers.Layer):
    """Variables shaped as :data:`SHAPES`; the output is ``sum(w * x)`` over them, so that
    the gradient of each variable is exactly its slice of the input."""

    def build(self, input_shape):
        self.weights_by_name = {n: self.add_weight(shape=s, name=n, initializer=keras.initializers.Constant(INIT[n]))
                                for n, s in SHAPES.items()}

    def call(self, x):
        total, start = 0.0, 0
        for n, w in self.weights_by_name.items():
            piece = x[:, start:start + SIZES[n]]
            total = total + keras.ops.sum(piece * keras.ops.reshape(w, (1, -1)), axis=1)
            start += SIZES[n]
        return keras.ops.expand_dims(total, 1)


def value_as_loss(y_true, y_pred):
    return y_pred


def feed_model(optimizer):
    model = keras.Sequential([keras.Input((sum(SIZES.values()),)), Feed()])
    model.compile(optimizer=optimizer, loss=value_as_loss)
    return model


def feed_rows(grads):
    return np.stack([np.concatenate([step[n].reshape(-1) for n in SHAPES]) for step in grads])


def fit(model, grads, **kwargs):
    """``model.fit`` one step per row of gradients (batches of one, in order); the variables
    after each step."""
    out = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            out.append(weights_of(model))

    rows = feed_rows(grads)
    model.fit(rows, np.zeros((len(rows), 1), np.float32), batch_size=1, shuffle=False,
              epochs=1, verbose=0, callbacks=[Record()], **kwargs)
    return out


def weights_of(model):
    if hasattr(model, "jax_state_sync"):  # JAX: the step's values back into the variables
        model.jax_state_sync()
    layer = model.layers[-1]
    return {n: keras.ops.convert_to_numpy(w) for n, w in layer.weights_by_name.items()}


# --- the checks -------------------------------------------------------------------------------

def hyperparameters(rule_name):
    return dict({"weight_decay": 0.1}, **({"momentum": 0.9} if rule_name == "sgd" else {}))


def check_apply():
    """Every rule, with weight decay, and GAN in front of SGD: eager ``apply``."""
    out = {}
    for rule_name, cls in adapter.OPTIMIZERS.items():
        hyper = hyperparameters(rule_name)
        got = keras_apply(cls(learning_rate=LR, **hyper), GRADS)
        out[rule_name] = difference(got, pure(rule_name, GRADS, rates=[LR] * STEPS, **hyper))
    got = keras_apply(adapter.SGD(learning_rate=LR, momentum=0.9, gan=True), GRADS)
    out["gan+sgd"] = difference(got, pure("sgd", GRADS, rates=[LR] * STEPS, momentum=0.9,
                                          gan=dict(GAN.defaults)))
    return out


def check_skip_nonfinite():
    """With ``skip_nonfinite=True`` a step whose gradients hold an Inf or a NaN changes
    nothing (variables, state, iterations), eagerly and in a compiled ``fit``; the run
    is then the pure rule's without that step."""
    import numpy as np

    out = {}
    bad_step = {n: np.array(g) for n, g in GRADS[1].items()}
    first = next(iter(SHAPES))
    bad_step[first].reshape(-1)[0] = np.inf
    grads = [GRADS[0], bad_step, *GRADS[2:]]
    kept = [GRADS[0], *GRADS[2:]]
    for rule_name, cls in adapter.OPTIMIZERS.items():
        hyper = hyperparameters(rule_name)
        optimizer = cls(learning_rate=LR, skip_nonfinite=True, **hyper)
        got = keras_apply(optimizer, grads)
        unchanged = difference([got[1]], [got[0]])
        expected = pure(rule_name, kept, rates=[LR] * len(kept), **hyper)
        out[rule_name] = {"skipped_step_changed": unchanged,
                          "vs_pure_without_it": difference([got[0], *got[2:]], expected),
                          "iterations": int(keras.ops.convert_to_numpy(optimizer.iterations)),
                          "steps": len(grads)}
    return out


def check_schedule_decay_and_ema():
    """``model.fit`` with a schedule, the bias excluded from weight decay, and
    ``use_ema``: the trajectory is the pure rule's, and after ``fit`` the model holds
    its moving average."""
    schedule = keras.optimizers.schedules.ExponentialDecay(LR, decay_steps=2, decay_rate=0.5)
    optimizer = adapter.MVNGrad(learning_rate=schedule, weight_decay=0.1, use_ema=True,
                                ema_momentum=0.5)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    model = feed_model(optimizer)
    trajectory = fit(model, GRADS)
    rates = [float(keras.ops.convert_to_numpy(schedule(t))) for t in range(STEPS)]
    decayed = [n for n in SHAPES if n != "bias"]
    expected = [{**a, **b} for a, b in zip(
        pure("mvn", GRADS, rates=rates, names=decayed, weight_decay=0.1),
        pure("mvn", GRADS, rates=rates, names=("bias",)))]
    average = {n: expected[0][n].astype(np.float64) for n in SHAPES}
    for step in expected[1:]:
        average = {n: 0.5 * average[n] + 0.5 * step[n] for n in SHAPES}
    return {"trajectory": difference(trajectory, expected),
            "bias_decayed": difference(trajectory, pure("mvn", GRADS, rates=rates,
                                                         weight_decay=0.1)),
            "final_is_average": difference([weights_of(model)], [average]), "rates": rates}


def check_clipping():
    """``clipnorm`` (each gradient) and ``global_clipnorm`` (all together), with SGD with
    momentum, whose steps scale with the gradients; the reference clips in float64."""
    out = {}
    for option, limit in (("clipnorm", 1.0), ("global_clipnorm", 2.0)):
        got = keras_apply(adapter.SGD(learning_rate=LR, momentum=0.9, **{option: limit}), GRADS)
        clipped = [clip(step, option, limit) for step in GRADS]
        out[option] = difference(got, pure("sgd", clipped, rates=[LR] * STEPS, momentum=0.9))
        out[option + "_unclipped"] = difference(got, pure("sgd", GRADS, rates=[LR] * STEPS,
                                                          momentum=0.9))
    return out


def clip(step, option, limit):
    if option == "clipnorm":
        return {n: (g * limit / max(np.linalg.norm(g.astype(np.float64)), limit)).astype(np.float32)
                for n, g in step.items()}
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in step.values()))
    return {n: (g * (limit / max(norm, limit))).astype(np.float32) for n, g in step.items()}


def check_accumulation_and_gan():
    """``gradient_accumulation_steps=2`` (gradients averaged as Keras averages them) with
    GAN in front of NovoGrad: both take statistics of whole tensors, GAN of all of them."""
    gan = {"center": "channel", "scale": "global_std"}
    optimizer = adapter.NovoGrad(learning_rate=LR, gradient_accumulation_steps=2, gan=gan)
    got = fit(feed_model(optimizer), GRADS)
    averaged = [{n: (b[n] + a[n]) / np.float32(2) for n in SHAPES}
                for a, b in zip(GRADS[0::2], GRADS[1::2])]
    expected = pure("novograd", averaged, rates=[LR] * len(averaged), gan=gan)
    return {"difference": difference(got[1::2], expected),
            "between_updates": difference(got[0::2], [INIT] + expected[:-1]),
            "iterations": int(keras.ops.convert_to_numpy(optimizer.iterations))}


def check_config():
    schedule = keras.optimizers.schedules.CosineDecay(LR, decay_steps=10)
    optimizer = adapter.MaxVA(learning_rate=schedule, b2_min=0.8, gan=True, state_dtype="float32",
                              clipnorm=1.0, name="maxva_opt")
    config = optimizer.get_config()
    again = adapter.MaxVA.from_config(json.loads(json.dumps(config)))
    revived = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    return {"same_config": again.get_config() == config,
            "revived_class": type(revived).__name__,
            "revived_same_config": revived.get_config() == config,
            "config": {k: config[k] for k in ("b1", "b2_min", "gan", "state_dtype", "clipnorm")}}


def check_state_variables():
    """Names, shapes and dtypes of the state's variables, against the rule's ``init``."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        for rule_name in ("mvn", "novograd"):
            variable = keras.Variable(np.ones((3, 2)), dtype=dtype, name="w")
            optimizer = adapter.OPTIMIZERS[rule_name](learning_rate=LR)
            optimizer.build([variable])
            state = mvn_core.rules[rule_name].init([core_array(np.ones((3, 2)), dtype)])
            made = {v.path.split("/")[-1]: (tuple(v.shape), keras.backend.standardize_dtype(v.dtype))
                    for v in optimizer.variables[2:]}
            expected = {f"w_{name}": (tuple(getattr(state, name)[0].shape),
                                      keras.backend.standardize_dtype(getattr(state, name)[0].dtype))
                        for name in state._fields[1:]}
            out[f"{rule_name} {dtype}"] = {"made": made, "same_as_init": made == expected}
    return out


def check_state_dtype_step():
    """bfloat16 variables with float32 state: one step is the pure rule's."""
    variable = keras.Variable(INIT["kernel"], dtype="bfloat16", name="kernel")
    optimizer = adapter.MVNGrad(learning_rate=LR, state_dtype="float32")
    grad = keras.ops.convert_to_tensor(GRADS[0]["kernel"].astype(np.float32))
    optimizer.apply([keras.ops.cast(grad, "bfloat16")], [variable])
    rule = mvn_core.rules["mvn"]
    params = [core_array(INIT["kernel"], "bfloat16")]
    updates, _ = rule.update(rule.init(params, state_dtype="float32"),
                             [core_array(GRADS[0]["kernel"], "bfloat16")], params,
                             lr=core_array(LR))
    expected = to_numpy(mvn_core.apply_updates(params, updates)[0])
    got = keras.ops.convert_to_numpy(keras.ops.cast(variable, "float32"))
    dtypes = sorted({keras.backend.standardize_dtype(v.dtype) for v in optimizer.variables[2:]})
    return {"difference": float(np.max(np.abs(got - expected))), "state_dtypes": dtypes}


def check_save_and_resume(folder):
    """``model.save`` after 3 steps, ``load_model``, 3 more: the uninterrupted run, which
    is the pure rule's (with GAN and weight decay)."""
    def make():
        return adapter.MVNGrad(learning_rate=LR, weight_decay=0.1, gan=True)

    whole = fit(feed_model(make()), GRADS)
    first = feed_model(make())
    fit(first, GRADS[:3])
    path = os.path.join(folder, "model.keras")
    first.save(path)
    loaded = keras.models.load_model(path, custom_objects={"Feed": Feed, "value_as_loss": value_as_loss})
    state_equal = all(np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
                      for a, b in zip(first.optimizer.variables, loaded.optimizer.variables))
    rest = fit(loaded, GRADS[3:])
    expected = pure("mvn", GRADS, rates=[LR] * STEPS, weight_decay=0.1, gan=dict(GAN.defaults))
    return {"difference": difference(rest, whole[3:]), "whole_vs_pure": difference(whole, expected),
            "optimizer": type(loaded.optimizer).__name__,
            "iterations": int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)),
            "state_equal": state_equal,
            "variables": len(loaded.optimizer.variables)}


def check_training():
    """A small classifier on random data: the loss falls."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 10)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((10, 3)), axis=1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(32, activation="tanh"),
                              keras.layers.Dense(3)])
    model.compile(optimizer=adapter.MVNGrad(learning_rate=1e-2, weight_decay=0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    return {"loss": history["loss"], "accuracy": history["accuracy"]}


def check_refusals():
    """Bad arguments: the error each raises (type and message)."""
    cases = {
        "b1 out of range": lambda: adapter.MVNGrad(b1=1.5),
        "negative learning rate": lambda: adapter.MVNGrad(learning_rate=-1.0),
        "lr for learning_rate": lambda: adapter.MVNGrad(lr=0.1),
        "array hyperparameter": lambda: adapter.MVNGrad(b1=keras.ops.convert_to_tensor(0.9)),
        "nesterov without momentum": lambda: adapter.SGD(nesterov=True),
        "unknown GAN option": lambda: adapter.MVNGrad(gan={"center": "row"}),
        "callable GAN scale": lambda: adapter.MVNGrad(gan={"scale": lambda sigma, state: 1.0}),
        "unknown argument": lambda: adapter.MVNGrad(beta_1=0.9),
        "generic class": lambda: adapter.RuleOptimizer(),
        "GAN as a class": lambda: adapter.optimizer_class("gan"),
    }
    out = {}
    for name, make in cases.items():
        try:
            make()
            out[name] = "no error"
        except Exception as error:  # reported, the test asserts on it
            out[name] = f"{type(error).__name__}: {error}"
    return out


def main():
    checks = {"refusals": check_refusals, "apply": check_apply, "clipping": check_clipping, "config": check_config,
              "state_variables": check_state_variables,
              "state_dtype_step": check_state_dtype_step, "skip_nonfinite": check_skip_nonfinite,
              "schedule_decay_ema": check_schedule_decay_and_ema,
              "accumulation_gan": check_accumulation_and_gan, "training": check_training}
    report = {"backend": BACKEND}
    for name, check in checks.items():
        started = time.perf_counter()
        report[name] = check()
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        report["resume"] = check_save_and_resume(folder)
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
