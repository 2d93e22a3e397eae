"""The MVN-Grad paper's three numerical claims, reproduced from the rules' functions."""

from __future__ import annotations

import numpy as np

from mvn_core import cli
from mvn_core.demo import claims


def test_variance_ratio_is_about_half_at_b2_09_and_one_at_0999():
    """Normalizing before the momentum removes the variance that AdaBelief's fixed
    momentum picks up through the random denominator, visible only when v moves."""
    assert abs(claims.variance_ratio(0.9) - 0.48) < 0.02
    assert abs(claims.variance_ratio(0.999) - 1.0) < 0.005
    ratios = claims.variance_table(b2s=(0.5, 0.9, 0.99), noises=("gaussian",))["gaussian"]
    assert ratios == sorted(ratios) and ratios[0] < 0.1


def test_spike_response_is_bounded_for_mvn_and_unbounded_for_adam_when_b1_squared_exceeds_b2():
    sizes = (1e2, 1e6, 1e10)
    adam = claims.spike_response("adam", sizes, b1=0.9, b2=0.5)
    mvn = claims.spike_response("mvn", sizes, b1=0.9, b2=0.5)
    assert np.all(np.diff(np.log10(adam)) > 2), adam  # grows like G^0.7
    assert adam[-1] > 1e5
    assert np.all(mvn < 2) and np.ptp(mvn) < 0.1, mvn
    for b2 in (0.5, 0.999):  # MVN-Grad is bounded for any betas; Adam too once b1^2 < b2
        assert np.max(claims.spike_response("mvn", sizes, b1=0.9, b2=b2)) < 2
    assert np.max(claims.spike_response("adam", sizes, b1=0.9, b2=0.999)) < 2


def test_mvn_direction_grows_as_noise_vanishes_while_adam_and_laprop_tend_to_sign():
    sigmas = (1e-1, 1e-3, 1e-5)
    mvn = claims.low_noise_directions("mvn", sigmas, draws=8)
    np.testing.assert_allclose(mvn * np.asarray(sigmas), mvn[0] * sigmas[0], rtol=0.2)  # ~ 1/sigma
    assert mvn[-1] > 1e4
    for rule in ("adam", "laprop"):
        directions = claims.low_noise_directions(rule, sigmas, draws=8)
        np.testing.assert_allclose(directions[1:], 1.0, rtol=1e-3)


def test_claims_command_prints_tables_and_writes_three_plots(tmp_path, capsys):
    assert cli.main(["claims", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for title in ("Claim 1", "Claim 2", "Claim 3", "MVN-Grad", "LaProp", "AdaBelief"):
        assert title in out
    pngs = sorted(tmp_path.glob("mvn-core-claim*.png"))
    assert len(pngs) == 3
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
