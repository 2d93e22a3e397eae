"""Test set-up shared by the whole suite: the backend table and global library flags.

A test that takes a ``target`` argument runs on every backend x device x path of
:mod:`mvn_core.conformance.targets`; one that also takes ``dtype`` runs for each
floating dtype (of the module's ``DTYPES``, default float32 and float64) that the
target supports.  Targets whose library or device is missing are reported as skipped.
"""

from __future__ import annotations

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
