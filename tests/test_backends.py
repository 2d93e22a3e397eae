"""The backend modules: availability, namespaces, devices, conversion, dtypes, hooks."""

from __future__ import annotations

import numpy as np
import pytest

from mvn_core import backends


def test_every_library_is_reported_available_or_why_not():
    status = backends.status()
    assert tuple(status) == backends.NAMES
    assert status["numpy"] is None
    for reason in status.values():
        assert reason is None or (isinstance(reason, str) and reason)
    assert set(backends.available()) == {n for n, r in status.items() if r is None}


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'mxnet'"):
        backends.get("mxnet")


def test_round_trip_for_every_dtype(target):
    lib = backends.get(target.backend)
    xp = lib.namespace()
    values = np.array([[0.5, -1.25, 3.0]])
    for name, dtype in lib.dtypes(target.device).items():
        x = lib.from_numpy(values, device=target.device, dtype=name)
        assert x.dtype == dtype and x.shape == (1, 3)
        assert xp.isdtype(x.dtype, "real floating")
        back = lib.to_numpy(x)
        assert isinstance(back, np.ndarray)
        np.testing.assert_array_equal(back, values)  # these values are exact in every dtype


def test_devices_and_default(target):
    lib = backends.get(target.backend)
    devices = lib.devices()
    assert devices and str(lib.default_device()) in map(str, devices)


def test_compile_hook_and_sync(target):
    lib = backends.get(target.backend)
    reason = getattr(lib, "compile_unavailable_reason", lambda device: None)(target.device)
    if reason is not None:
        pytest.skip(reason)

    def double_plus_one(x):
        return 2 * x + 1

    x = lib.from_numpy(np.arange(3.0), device=target.device, dtype="float32")
    y = lib.synchronize(lib.compile(double_plus_one)(x))
    np.testing.assert_array_equal(lib.to_numpy(y), [1.0, 3.0, 5.0])


def test_strict_has_a_device_without_float64():
    lib = backends.get("array_api_strict")
    if lib.unavailable_reason():
        pytest.skip(lib.unavailable_reason())
    no64 = lib.namespace().Device("no_float64")
    assert "float64" not in lib.dtypes(no64) and "float32" in lib.dtypes(no64)
