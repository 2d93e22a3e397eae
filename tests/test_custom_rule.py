"""A rule defined outside the package (examples/custom_rule.py): trained through the
torch and optax adapters, and checked with ``mvn-core check --rules-from`` against the
float64 reference its module gives."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

import mvn_core
from mvn_core import cli
from mvn_core.conformance import oracle, paths

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def at_root(monkeypatch):
    """The repository's root as the working directory, where ``examples`` imports."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    yield
    for name in [m for m in sys.modules if m.startswith(("examples", "wrong_reference"))]:
        del sys.modules[name]


def _example():
    import examples.custom_rule as example

    return example


def test_the_example_trains_with_torch_and_optax(at_root):
    pytest.importorskip("torch")
    pytest.importorskip("optax")
    example = _example()
    for losses in (example.train_with_torch(60), example.train_with_optax(60)):
        assert losses[-1] < 0.2 * losses[0]
    assert "rmsprop" not in mvn_core.rules  # defined, used, never registered


def test_check_rules_from_passes_on_every_path_and_registers_nothing_after(at_root, tmp_path,
                                                                         capsys):
    report_path = tmp_path / "report.json"
    status = cli.main(["check", "--rules-from", "examples.custom_rule", "--dtypes", "float32",
                       "--no-progress", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert status == 0, capsys.readouterr().out
    cells = report["cells"]
    assert {c["rule"] for c in cells} == {"rmsprop"}
    expected = {"pure", "arrays-adapter"} | {
        name for name in ("torch-adapter", "torch-multi-tensor", "optax-adapter",
                          "optax-adapter-jit") if paths.PATHS[name].unavailable_reason() is None}
    assert expected <= {c["path"] for c in cells}
    assert report["passed"] and all(c["status"] == "pass" for c in cells)
    assert "rmsprop" not in mvn_core.rules and "rmsprop" not in oracle.ENTRIES


def test_check_rules_from_fails_on_a_wrong_reference(at_root, tmp_path, monkeypatch, capsys):
    (tmp_path / "wrong_reference.py").write_text(
        "import dataclasses\nimport numpy as np\n"
        "from examples.custom_rule import ORACLE, RMSPROP\n"
        "def step(t, theta, g, s, h):  # eps inside the square root: not the rule\n"
        "    s['v'] = h['alpha'] * s['v'] + (1 - h['alpha']) * g ** 2\n"
        "    return theta - h['lr'] * g / np.sqrt(s['v'] + h['eps'])\n"
        "ORACLE = {'rmsprop': dataclasses.replace(ORACLE['rmsprop'], step=step)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    status = cli.main(["check", "--rules-from", "wrong_reference", "--backends", "numpy",
                       "--dtypes", "float64", "--paths", "pure", "--no-progress"])
    assert status == 1
    assert "exceeds the rounding bound" in capsys.readouterr().out


def test_check_rules_from_needs_a_reference(at_root, tmp_path, monkeypatch, capsys):
    (tmp_path / "wrong_reference_missing.py").write_text(
        "from examples.custom_rule import RMSPROP\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check", "--rules-from", "wrong_reference_missing"])
    assert exit_.value.code == 2
    assert "ORACLE['rmsprop'] must be the rule's float64 reference" in capsys.readouterr().err


def test_a_registered_name_is_refused(at_root):
    example = _example()
    import dataclasses

    clash = dataclasses.replace(example.RMSPROP, name="adam")
    with pytest.raises(ValueError, match=r"rules called \['adam'\] are registered already"):
        with mvn_core.registry.including([clash]):
            pass
    assert mvn_core.rules["adam"] is not clash

