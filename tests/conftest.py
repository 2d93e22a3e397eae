"""Test set-up shared by the whole suite: the backend table and global library flags.

A test that takes a ``target`` argument runs on every backend x device x path of
:mod:`mvn_core.conformance.targets`; one that also takes ``dtype`` runs for each
floating dtype (of the module's ``DTYPES``, default float32 and float64) that the
target supports.  Targets whose library or device is missing are reported as skipped.
"""

from __future__ import annotations

import re

import pytest


def pytest_configure(config):
    try:  # float64 JAX arrays need x64; arrays with an explicit dtype keep theirs.
        import jax

        jax.config.update("jax_enable_x64", True)
    except ImportError:
        pass
    try:  # hold the core to the 2023.12 standard it promises
        import array_api_strict

        array_api_strict.set_array_api_strict_flags(api_version="2023.12")
    except ImportError:
        pass


def _torch_replay_helper_settled():
    """The torch replay's C++ helper built (or its failure known) before any test runs:
    its background build otherwise reads whatever a test has patched meanwhile (the
    cache folder, the compiler, ``subprocess.run``)."""
    try:
        from mvn_core.adapters import _torch_gather
    except ImportError:  # torch is not installed
        return
    _torch_gather.start()
    _torch_gather.wait_if_started()


def pytest_sessionstart(session):
    _torch_replay_helper_settled()


def pytest_generate_tests(metafunc):
    if "target" not in metafunc.fixturenames:
        return
    from mvn_core.conformance.targets import targets

    wanted = getattr(metafunc.module, "DTYPES", ("float32", "float64"))
    with_dtype = "dtype" in metafunc.fixturenames
    params = []
    for target, reason in targets():
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if not with_dtype:
            params.append(pytest.param(target, id=target.id, marks=marks))
            continue
        dtypes = wanted if reason else [d for d in wanted if d in target.dtypes()]
        params += [pytest.param(target, d, id=f"{target.id}-{d}", marks=marks) for d in dtypes]
    names = ("target", "dtype") if with_dtype else ("target",)
    metafunc.parametrize(names if with_dtype else "target", params)


@pytest.fixture
def assert_ieee_ptx():
    """A check of a GPU kernel's PTX (NVIDIA's assembly): each operation rounds to
    nearest as in IEEE arithmetic, as the CPU's kernels do: no fused multiply-add, no
    approximate instruction, no flushing of subnormals to zero; and, where the rule
    divides or takes square roots (its traced operations say), the IEEE ones of
    ``width`` (f32/f64)."""
    def check(ptx: str, width: str, rule_name: str) -> set:
        instructions = set(re.findall(r"(?<![\w.%])([a-z]+(?:\.[a-z0-9]+)+)", ptx))
        assert not {i for i in instructions if i.startswith("fma")}
        assert not {i for i in instructions if ".approx" in i or ".ftz" in i}
        ops = _traced_operations(rule_name)
        assert {f"{op}.rn.{width}" for op in ("div", "sqrt") if op in ops} <= instructions
        return instructions
    return check


def _traced_operations(rule_name: str) -> set:
    """The operations of the rule's kernel (float32, weight decay on)."""
    import array_api_compat.numpy as npx
    import numpy as np

    import mvn_core
    from mvn_core.adapters import _cpu_kernel, _elementwise

    tensor_rule = mvn_core.rules[rule_name].tensor_rule
    hyper = tensor_rule.checked_hyperparameters(
        {**mvn_core.rules[rule_name].defaults, "weight_decay": 0.1})
    step_scalars = tensor_rule.scalars(npx, npx.asarray(3), np.dtype("float32"), hyper)
    trace = _cpu_kernel.traced(tensor_rule, _elementwise.describe(step_scalars),
                               ("float32",) * 4, True)
    return {node.op for node in trace.nodes}
