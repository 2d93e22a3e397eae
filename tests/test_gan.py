"""Gradient Autoscaled Normalization: its properties, and GAN in front of SGD-momentum."""

from __future__ import annotations

import numpy as np
import pytest

import mvn_core
from mvn_core import backends
from mvn_core.conformance import oracle
from mvn_core.conformance.problems import make_problem


def _convert(target, dtype):
    lib = backends.get(target.backend)
    return lib, (lambda arrays: [lib.from_numpy(a, device=target.device, dtype=dtype)
                                 for a in arrays])


def _transform(target, dtype, grads, **options):
    lib, convert = _convert(target, dtype)
    g = convert(grads)

    def apply(state, g):
        return mvn_core.gan_update(state, g, **options)[0]

    out = (lib.compile(apply) if target.compiled else apply)(mvn_core.gan_init(g), g)
    return [lib.to_numpy(a).astype(np.float64) for a in out]


def _grads():
    rng = np.random.default_rng(11)
    return [3.0 + rng.standard_normal((6, 4)), rng.standard_normal((2, 3, 3, 2)) - 1.0,
            rng.standard_normal(5) + 7.0, np.asarray(2.5), np.zeros((0, 4))]


@pytest.mark.parametrize("center", ["tensor", "channel"])
def test_centred_tensors_have_zero_mean(target, dtype, center):
    grads = _grads()
    out = _transform(target, dtype, grads, center=center)
    atol = 1e-12 if dtype == "float64" else 1e-5
    for g, o in zip(grads[:2], out[:2]):
        axes = None if center == "tensor" else tuple(range(1, g.ndim))
        np.testing.assert_allclose(np.mean(o, axis=axes), 0.0, atol=atol)


def test_global_std_of_output_is_one(target, dtype):
    out = _transform(target, dtype, _grads())
    eligible = np.concatenate([out[0].ravel(), out[1].ravel()])
    # sigma / (sigma + 1e-12): one up to the guard's 1e-12 (sigma is about 1 here)
    np.testing.assert_allclose(np.sqrt(np.mean(eligible ** 2)), 1.0,
                               rtol=1e-11 if dtype == "float64" else 1e-5)


def test_ineligible_tensors_pass_through_untouched(target, dtype):
    grads = [np.asarray(g, dtype=dtype) for g in _grads()]
    out = _transform(target, dtype, grads)
    np.testing.assert_array_equal(out[2], grads[2])
    np.testing.assert_array_equal(out[3], grads[3])
    assert out[4].shape == (0, 4)


def test_all_equal_gradients_give_zeros_and_no_nan(target, dtype):
    grads = [np.full((3, 4), 0.7), np.full((2, 2, 2), -5.0), np.ones(3)]
    out = _transform(target, dtype, grads)
    for o in out[:2]:
        assert np.all(o == 0.0)
    np.testing.assert_array_equal(out[2], np.ones(3))


@pytest.mark.parametrize("center", ["tensor", "channel"])
def test_large_constant_float32_tensors_centre_to_exact_zeros(center):
    """Millions of equal entries: the rounding of the first mean is removed exactly by
    the second, for constants of any magnitude."""
    values = [0.7, -3.1e-6, 12345.678, 2.5e15]
    grads = [np.full((2048, 1024), v, dtype=np.float32) for v in values]
    out, _ = mvn_core.gan_update(mvn_core.gan_init(grads), grads, center=center)
    for o in out:
        assert o.dtype == np.float32 and not np.any(o)


def test_scale_none_is_plain_centralization():
    grads = _grads()
    state = mvn_core.gan_init(grads)
    out, _ = mvn_core.gan_update(state, grads, scale="none")
    np.testing.assert_allclose(out[0], grads[0] - grads[0].mean(), rtol=0, atol=1e-14)


def test_callable_scale_keeps_its_extra_state():
    grads = _grads()
    seen = []

    def relative_to_first(sigma, state):
        seen.append(state.extra)
        first = state.extra[0] if state.extra else sigma
        return first / sigma, (first,)

    state = mvn_core.gan_init(grads)
    out1, state = mvn_core.gan_update(state, grads, scale=relative_to_first)
    out2, state = mvn_core.gan_update(state, [2 * g for g in grads], scale=relative_to_first)
    assert seen[0] == () and len(seen[1]) == 1
    assert int(state.count) == 2
    # alpha = sigma_1 / sigma_t: step 1 is plain centring, and step 2's doubled gradients
    # are brought back to step 1's scale
    np.testing.assert_allclose(out1[0], grads[0] - grads[0].mean(), rtol=1e-12)
    np.testing.assert_allclose(out2[0], out1[0], rtol=1e-12)


def test_gan_then_sgd_momentum_matches_oracle(target):
    """The composition of docs/algorithms.md, "GAN": GAN in front of SGD with momentum."""
    lib, convert = _convert(target, "float32" if "float64" not in target.dtypes() else "float64")
    problem = make_problem(40, seed=13)
    params = convert(problem.params)
    gan_state, sgd_state = mvn_core.gan_init(params), mvn_core.sgd_init(params)

    def step(params, gan_state, sgd_state, grads):
        g_hat, gan_state = mvn_core.gan_update(gan_state, grads)
        updates, sgd_state = mvn_core.sgd_update(sgd_state, g_hat, params, lr=0.01, momentum=0.9)
        return mvn_core.apply_updates(params, updates), gan_state, sgd_state

    step = lib.compile(step) if target.compiled else step
    for grads in problem.grads:
        params, gan_state, sgd_state = step(params, gan_state, sgd_state, convert(grads))
    transformed = [oracle.transformed("gan", g)[0] for g in problem.grads]
    expected = oracle.trajectory("sgd", problem.params, transformed, lr=0.01, momentum=0.9)[-1]
    rtol = 1e-12 if "float64" in target.dtypes() else 1e-5
    for p, e in zip(params, expected):
        np.testing.assert_allclose(lib.to_numpy(p), e, rtol=rtol, atol=rtol)


def test_bad_options_are_refused():
    grads = _grads()
    state = mvn_core.gan_init(grads)
    with pytest.raises(ValueError, match="center="):
        mvn_core.gan_update(state, grads, center="rows")
    with pytest.raises(ValueError, match="scale="):
        mvn_core.gan_update(state, grads, scale="median")
