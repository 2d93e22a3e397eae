"""The TensorFlow half of ``tests/test_backend_tensorflow.py``, in a process of its own
(TensorFlow stays out of the test process): ``mvn-core check --namespace`` on
:mod:`mvn_core.backends.tensorflow_namespace`, the backend module's functions, and the
namespace's own behaviour where it differs from TensorFlow's.  Prints one JSON line.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import array_api_compat
import numpy as np
import tensorflow as tf

import mvn_core
from mvn_core import backends
from mvn_core.backends import tensorflow_namespace as xp
from mvn_core import cli

MODULE = "mvn_core.backends.tensorflow_namespace"
CHECK_STEPS = 5


def conformance():
    """``mvn-core check --namespace``: every rule and dtype against the float64 oracle."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "check.json")
        status = cli.main(["check", "--namespace", MODULE, "--no-progress", "--steps",
                           str(CHECK_STEPS), "--json", path])
        with open(path) as f:
            report = json.load(f)
    return {"status": status, "cells": [(c["rule"], c["dtype"], c["path"], c["status"])
                                        for c in report["cells"]]}


def backend_module():
    lib = backends.get("tensorflow")
    values = np.array([[0.5, -1.25, 3.0]])
    round_trips = {}
    for name, dtype in lib.dtypes().items():
        x = lib.from_numpy(values, dtype=name)
        back = lib.to_numpy(x)
        round_trips[name] = (x.dtype == dtype and isinstance(back, np.ndarray)
                             and np.array_equal(back, values))
    doubled = lib.synchronize(lib.compile(lambda x: 2 * x + 1)(lib.from_numpy(np.arange(3.0))))
    return {"round_trips": round_trips, "devices": lib.devices(),
            "default_device": lib.default_device(), "compiled": lib.to_numpy(doubled).tolist(),
            "unavailable_reason": lib.unavailable_reason()}


def namespace_behaviour():
    f32, f64 = xp.asarray([1.0, 2.0], dtype=xp.float32), xp.asarray([0.5, 0.25], dtype=xp.float64)
    nan = xp.asarray([math.nan, -2.0, 5.0], dtype=xp.float32)
    seen_in_function = {}

    @tf.function
    def traced(t):
        seen_in_function["device"] = xp.asarray(t).device
        return t

    traced(tf.constant(1.0))
    variable = tf.Variable([1.0, 2.0])
    sparse = tf.IndexedSlices(tf.constant([[1.0]]), tf.constant([1]), tf.constant([2, 1]))
    try:
        f32 + "text"
        mixed = "no error"
    except TypeError as error:
        mixed = str(error)
    try:
        xp.result_type(xp.float32, xp.int32)
        kinds = "no error"
    except TypeError as error:
        kinds = str(error)
    return {
        "namespace_found": array_api_compat.array_namespace(f32) is xp,
        "promoted": (f32 + f64).dtype.name, "bfloat16_and_float16": xp.result_type(
            xp.bfloat16, xp.float16).name,
        "clip_keeps_nan": np.asarray(xp.clip(nan, min=0.0, max=1.0)).tolist(),
        "where_with_numbers": np.asarray(xp.where(nan > 0, nan, 0.0)).tolist(),
        "isdtype": [xp.isdtype(xp.bfloat16, "real floating"), xp.isdtype(xp.int64, "integral"),
                    xp.isdtype(xp.float32, ("integral", "bool"))],
        "finfo_bfloat16": xp.finfo(xp.bfloat16).smallest_normal,
        "device": f32.device, "device_in_function": seen_in_function["device"],
        "variable": np.asarray(xp.asarray(variable)).tolist(),
        "sparse_made_dense": np.asarray(xp.asarray(sparse)).tolist(),
        "float64_number_kept": float(xp.clip(f64, min=1 - 0.999)[1]) == 0.25,
        "mixed_operand": mixed, "mixed_kinds": kinds,
    }


def compiled_rule():
    """MVN-Grad with NovoGrad's per-tensor norm and GAN, stepped under ``tf.function``
    (the backend's compile hook) and eagerly: within float32 rounding."""
    lib = backends.get("tensorflow")
    rng = np.random.default_rng(0)
    params = [lib.from_numpy(rng.standard_normal(s), dtype="float32") for s in ((4, 3), (3,))]
    grads = [lib.from_numpy(rng.standard_normal(s), dtype="float32") for s in ((4, 3), (3,))]
    out = {}
    for name in ("mvn", "novograd"):
        rule = mvn_core.rules[name]

        def step(params, state, grads, rule=rule):
            grads, _ = mvn_core.gan_update(mvn_core.gan_init(params), grads)
            updates, state = rule.update(state, grads, params, lr=1e-2, weight_decay=0.1)
            return mvn_core.apply_updates(params, updates), state

        eager = step(params, rule.init(params), grads)[0]
        compiled = lib.compile(step)(params, rule.init(params), grads)[0]
        out[name] = max(float(np.max(np.abs(lib.to_numpy(a) - lib.to_numpy(b))))
                        for a, b in zip(eager, compiled))
    return out


def main():
    report = {"conformance": conformance(), "backend": backend_module(),
              "namespace": namespace_behaviour(), "compiled_rule": compiled_rule()}
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
