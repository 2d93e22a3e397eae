"""TensorFlow's thin Array-API namespace (:mod:`mvn_core.backends.tensorflow_namespace`)
and its backend module, checked in a process of their own (``workers/
tensorflow_namespace.py``), so that TensorFlow stays out of this one."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvn_core import backends
from mvn_core.conformance.cases import rule_names
from mvn_core.conformance.check import DTYPES

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "workers" / "tensorflow_namespace.py"
TIMEOUT = 600  # seconds: about 30 on a busy 2-core machine


@pytest.fixture(scope="module")
def report():
    if importlib.util.find_spec("tensorflow") is None:  # not imported here: see the docstring
        pytest.skip("tensorflow is not installed (pip install tensorflow)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                         timeout=TIMEOUT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_rule_and_dtype_passes_the_check_against_the_oracle(report):
    """``mvn-core check --namespace mvn_core.backends.tensorflow_namespace``."""
    check = report["conformance"]
    assert check["status"] == 0
    assert sorted(map(tuple, check["cells"])) == sorted(
        (rule, dtype, "pure", "pass") for rule in rule_names() for dtype in DTYPES)


def test_the_backend_module(report):
    module = report["backend"]
    assert module["unavailable_reason"] is None
    assert module["round_trips"] == {name: True for name in DTYPES}
    assert module["devices"][0] == module["default_device"] == "CPU:0"
    assert module["compiled"] == [1.0, 3.0, 5.0]


def test_the_rules_compiled_by_tf_function_agree_with_eager_ones(report):
    for rule, difference in report["compiled_rule"].items():
        assert difference <= 1e-6, rule


def test_where_the_namespace_differs_from_tensorflow(report):
    ns = report["namespace"]
    assert ns["namespace_found"]  # array_api_compat resolves it from the arrays
    assert ns["promoted"] == "float64" and ns["bfloat16_and_float16"] == "float32"
    clipped = ns["clip_keeps_nan"]
    assert math.isnan(clipped[0]) and clipped[1:] == [0.0, 1.0]
    assert ns["where_with_numbers"] == [0.0, 0.0, 5.0]
    assert ns["isdtype"] == [True, True, False]
    assert ns["finfo_bfloat16"] == 2.0 ** -126
    assert ns["device"] == "CPU:0" and ns["device_in_function"] is None
    assert ns["variable"] == [1.0, 2.0] and ns["sparse_made_dense"] == [[0.0], [1.0]]
    assert ns["float64_number_kept"]  # a Python number is not rounded to float32 first
    assert ns["mixed_operand"].startswith("an operand of a str")
    assert ns["mixed_kinds"] == "no promotion between float32 and int32 in this namespace"


def test_the_backend_is_known_but_outside_the_matrix():
    assert "tensorflow" in backends.PARTIAL and "tensorflow" not in backends.NAMES
    assert backends.get("tensorflow").NAME == "tensorflow"
