"""The optax transformations and the pure rules under ``jax.jit`` with params sharded
over a mesh of four devices (host CPU devices, made in a process of its own so that
the rest of the suite keeps one device): the results are the unsharded ones and the
optimizer state keeps the params' layout, with nothing gathered onto one device.

``workers/distributed_jax.py`` runs everything once and prints a report; the tests
assert on it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

import mvn_core  # noqa: E402
from mvn_core.adapters import optax as adapter  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "distributed_jax.py"
TIMEOUT = 300  # seconds: about 40 on a busy 2-core machine
OPTAX = [*adapter.FACTORIES, "gan+sgd"]
RULES = list(mvn_core.rules)
REDUCING = {"novograd", "scale_by_novograd", "gan", "gan+sgd"}  # per-tensor statistics


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    # subprocess.run kills the worker if it runs over the time limit
    out = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(record, reduces):
    # float64: the sharded sums differ in rounding only, and the kernel that steps the
    # arrays of one device computes in IEEE arithmetic, the pure rule with XLA's
    # fused multiply-adds
    assert record["error"] <= 1e-12
    assert record["kernel_calls"] == 0  # sharded arrays take the pure rule
    assert record["params_and_updates_keep_layout"]
    assert record["state_keeps_layout"]
    assert record["all_gathers"] == 0  # no array is gathered, whole, onto a device
    assert record["other_collectives"] == 0  # nor scattered, exchanged or broadcast
    if not reduces:  # a per-coordinate step needs no communication at all
        assert record["all_reduces"] == 0
    else:
        assert record["all_reduces"] > 0


def test_every_transformation_is_in_the_report(report):
    assert sorted(report["optax"]) == sorted(OPTAX)
    assert sorted(report["pure"]) == sorted(RULES)


@pytest.mark.parametrize("name", OPTAX)
def test_optax_transformation_on_a_mesh(report, name):
    _check(report["optax"][name], name in REDUCING)
    # on one device, the generated kernel steps every rule with per-tensor mathematics
    assert report["optax"][name]["kernel_calls_one_device"] == (0 if name == "gan" else 1)


@pytest.mark.parametrize("name", RULES)
def test_pure_rule_on_a_mesh(report, name):
    _check(report["pure"][name], name in REDUCING)
    assert report["pure"][name]["kernel_calls_one_device"] == 0


def test_mesh_example_trains_with_the_state_laid_out_as_the_params():
    example = Path(__file__).parents[1] / "examples" / "jax_mesh_mvn_grad.py"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(example), "--steps", "60"], env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    losses = [float(line.split()[-1]) for line in lines if line.startswith("step")]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0]
    layouts = [line for line in lines if ": params " in line]
    assert len(layouts) == 4
    for line in layouts:  # "w1: params P(None, 'model'), state m P(None, 'model'), v ..., u ..."
        specs = re.findall(r"P\([^)]*\)", line)
        assert len(specs) == 4 and len(set(specs)) == 1, line
