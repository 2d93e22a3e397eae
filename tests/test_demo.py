"""The main demo: it trains on every installed backend, agrees, reports and plots."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mvn_core import cli
from mvn_core.demo import run as demo, with_keras as demo_keras
from mvn_core import backends


@pytest.mark.slow
def test_demo_trains_everywhere_and_agrees(tmp_path):
    plot = tmp_path / "curves.png"
    lines = []
    results = demo.run_demo(steps=60, plot_path=str(plot), show_progress=False, echo=lines.append)
    assert {r.run.backend for r in results if not r.path} == set(backends.available())
    assert {r.rule for r in results} == {"mvn", "adam"}
    adapter_runs = [r for r in results if r.path]
    in_process = [r for r in adapter_runs if r.path != demo_keras.PATH]
    assert {r.run.backend for r in in_process} == set(demo.FRAMEWORKS) & set(backends.available())
    keras_runs = [r for r in adapter_runs if r.path == demo_keras.PATH]
    assert sorted(r.run.backend for r in keras_runs) == sorted(demo_keras.available())
    for r in adapter_runs:  # autograd instead of the hand-written backward: rounding only
        if r.run.backend == "tensorflow":  # no pure run on TensorFlow: NumPy's is the check
            assert math.isnan(r.diff_from_pure)
            continue
        limit = 1e-12 if r.run.dtype == "float64" else 1e-4
        assert r.diff_from_pure <= limit, f"{r.label} is {r.diff_from_pure:g} from the pure run"
    for r in results:
        assert np.all(np.isfinite(r.losses)) and r.losses[-1] < 0.6 * r.losses[0]
        assert r.test[1] > 0.7, f"{r.rule} {r.run.label}: test accuracy {r.test[1]}"
        limit = 1e-12 if r.run.dtype == "float64" else 1e-4
        assert r.max_diff <= limit, f"{r.rule} {r.run.label} is {r.max_diff:g} from NumPy float64"
    text = "\n".join(lines)
    for r in results:
        assert r.label in text
    assert "max |dtheta| from: numpy float64" in text and "ms/step" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_command_line(tmp_path, capsys):
    plot = tmp_path / "p.png"
    assert cli.main(["demo", "--steps", "5", "--backends", "numpy", "--plot", str(plot),
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mvn   numpy cpu float32" in out and plot.exists()
    assert "keras" not in out  # Keras runs follow the selection of backends


def test_demo_refuses_unknown_backends(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--backends", "torhc"])
    assert "unknown backends ['torhc']" in capsys.readouterr().err
