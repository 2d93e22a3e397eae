"""The Keras optimizers of :mod:`mvn_core.adapters.keras` on Keras's three backends.

Keras chooses its backend when it is imported, so each backend runs in a process of its
own: ``workers/keras_backend.py`` (with ``KERAS_BACKEND`` set) runs every check once and
prints a report; the tests assert on it.  The three processes run at the same time.
Each compares the optimizers with the pure rule fed the same float32 gradients: eager
steps (``optimizer.apply``) must be the pure rule's bit for bit on every backend, and so
must ``model.fit`` on PyTorch (eager); under ``jax.jit`` and ``tf.function`` the
compiler may round differently, within :data:`COMPILED_TOLERANCE`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mvn_core

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "workers" / "keras_backend.py"
TIMEOUT = 600  # seconds: about 40-60 each on a busy 2-core machine, all three at once
LIBRARIES = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}
# Parameters are of order 1 and move by about 1e-2 per step: a few float32 roundings.
COMPILED_TOLERANCE = 1e-6
OPTIMIZERS = [r.name for r in mvn_core.rules.values() if r.kind == "optimizer"]


def _missing(backend):
    needed = ("keras", LIBRARIES[backend])
    absent = [m for m in needed if importlib.util.find_spec(m) is None]
    return f"{', '.join(absent)} not installed" if absent else None


@pytest.fixture(scope="module")
def reports():
    """Every available backend's report (or its failure), from processes run together."""
    running = {}
    for backend in LIBRARIES:
        if _missing(backend) is None:
            # three processes share the machine: one thread each (the tensors are small)
            env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu",
                       CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1",
                       TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
            running[backend] = subprocess.Popen([sys.executable, str(WORKER)], env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                text=True)
    out = {}
    for backend, process in running.items():
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        out[backend] = (process.returncode, stdout, stderr)
    return out


@pytest.fixture(params=list(LIBRARIES))
def report(request, reports):
    backend = request.param
    if _missing(backend):
        pytest.skip(_missing(backend))
    status, stdout, stderr = reports[backend]
    assert status == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    return result


def _tolerance(report):
    return 0.0 if report["backend"] == "torch" else COMPILED_TOLERANCE


def test_eager_steps_are_the_pure_rule_bit_for_bit(report):
    """``optimizer.apply`` for every rule, with weight decay, and GAN in front of SGD."""
    assert report["apply"] == {name: 0.0 for name in OPTIMIZERS + ["gan+sgd"]}


def test_skip_nonfinite_steps_change_nothing(report):
    """A step with an Inf in its gradients changes no variable, no state and not
    ``iterations``; the run is the pure rule's without that step, bit for bit."""
    assert set(report["skip_nonfinite"]) == set(OPTIMIZERS)
    for name, record in report["skip_nonfinite"].items():
        assert record["skipped_step_changed"] == 0.0, name
        assert record["vs_pure_without_it"] == 0.0, name
        assert record["iterations"] == record["steps"] - 1, name


def test_fit_with_a_schedule_excluded_weight_decay_and_ema(report):
    check = report["schedule_decay_ema"]
    assert check["trajectory"] <= _tolerance(report)
    assert check["bias_decayed"] > 1e-3  # decaying the bias too would be another trajectory
    assert check["final_is_average"] <= COMPILED_TOLERANCE  # Keras's EMA, in float32
    rates = check["rates"]
    assert rates[0] == pytest.approx(1e-2) and rates[2] == pytest.approx(0.5e-2)


def test_gradient_accumulation_with_gan_and_novograd(report):
    """GAN's global statistic and NovoGrad's norms under Keras's accumulation: the
    averaged gradients, one step per two batches, variables unchanged in between."""
    check = report["accumulation_gan"]
    assert check["difference"] <= _tolerance(report)
    assert check["between_updates"] <= _tolerance(report)
    assert check["iterations"] == 3


def test_clipnorm_and_global_clipnorm_clip_before_the_rule(report):
    check = report["clipping"]
    for option in ("clipnorm", "global_clipnorm"):
        assert check[option] <= COMPILED_TOLERANCE  # Keras clips in float32, the reference in float64
        assert check[option + "_unclipped"] > 1e-2


def test_state_variables_are_named_after_the_buffers_as_the_rule_makes_them(report):
    check = report["state_variables"]
    for case, record in check.items():
        assert record["same_as_init"], case
    assert check["mvn float32"]["made"] == {f"w_{b}": [[3, 2], "float32"] for b in "mvu"}
    assert check["novograd float32"]["made"]["w_v"] == [[], "float32"]


def test_float32_state_for_bfloat16_variables(report):
    check = report["state_dtype_step"]
    assert check == {"difference": 0.0, "state_dtypes": ["float32"]}


def test_get_config_from_config_and_keras_serialization(report):
    check = report["config"]
    assert check["same_config"] and check["revived_same_config"]
    assert check["revived_class"] == "MaxVA"
    assert check["config"] == {"b1": 0.9, "b2_min": 0.8, "state_dtype": "float32", "clipnorm": 1.0,
                               "gan": {"center": "tensor", "scale": "global_std"}}


def test_save_load_model_and_resume_give_the_uninterrupted_run(report):
    check = report["resume"]
    assert check["difference"] == 0.0
    assert check["whole_vs_pure"] <= _tolerance(report)
    assert check["optimizer"] == "MVNGrad" and check["iterations"] == 6
    assert check["state_equal"]
    assert check["variables"] == 2 + 3 * 4  # iterations, learning rate, m v u per variable


def test_a_small_classifier_trains(report):
    loss, accuracy = report["training"]["loss"], report["training"]["accuracy"]
    assert loss[-1] < 0.5 * loss[0]
    assert accuracy[-1] > 0.85


def test_bad_arguments_are_refused_by_name(report):
    refused = report["refusals"]
    expected = {
        "b1 out of range": "ValueError: b1=1.5 is out of range",
        "negative learning rate": "ValueError: learning_rate=-1.0 is out of range",
        "lr for learning_rate": "TypeError: MVNGrad takes learning_rate",
        "array hyperparameter": "TypeError: b1 must be a Python number",
        "nesterov without momentum": "ValueError: nesterov=True needs momentum > 0",
        "unknown GAN option": "ValueError: center='row'",
        "callable GAN scale": "TypeError: gan's scale must be one of GAN's named strategies",
        "unknown argument": "ValueError: Argument(s) not recognized",
        "generic class": "TypeError: RuleOptimizer is generic",
        "GAN as a class": "ValueError: gan is a gradient transform",
    }
    assert set(refused) == set(expected)
    for case, start in expected.items():
        assert refused[case].startswith(start), (case, refused[case])
