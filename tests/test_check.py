"""``mvn-core check`` and the golden trajectories.

The matrix itself is exercised on small selections (a rule or two, one or two
backends) to keep this file quick; ``test_rules_vs_oracle`` covers every rule on every
target at 100 steps.  What is tested here: the options, the reports, the exit status
on an injected failure, the goldens against the oracle, ``--namespace`` and ``--peers``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from mvn_core import backends
from mvn_core.conformance import check, oracle, paths, peers, references
from mvn_core.conformance.cases import cases, rule_names
from mvn_core.cli import main
from mvn_core.conformance.comparison import compare
from mvn_core.conformance.tolerance import spacing


def _check(capsys, *args):
    """``mvn-core check ARGS --json -`` in this process: (exit status, report, stderr)."""
    status = main(["check", "--no-progress", "--json", "-", *args])
    out, err = capsys.readouterr()
    return status, json.loads(out), err


def _installed(*names):
    missing = [n for n in names if backends.get(n).unavailable_reason()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


# --- the matrix and its reports --------------------------------------------------------------

def test_default_selection_has_every_rule_backend_dtype_and_path():
    cells, skipped = check.plan(check.Selection())
    ran = {(c.backend, c.path) for c in cells}
    for name in backends.available():
        for path in paths.PATHS.values():
            if path.applies_to(name) and not path.unavailable_reason():
                assert ((name, path.name) in ran) == path.by_default
    assert {c.rule for c in cells} == set(rule_names())
    unavailable = {k.backend for k in skipped if k.path == "all"}
    assert unavailable == set(backends.NAMES) - set(backends.available())
    for name in {"torch", "jax"} & set(backends.available()):
        assert {c.dtype for c in cells if c.backend == name} == set(check.DTYPES)


def test_a_path_may_take_some_rules_or_need_a_module(monkeypatch):
    monkeypatch.setitem(paths.PATHS, "only-sgd",
                        paths.Path("only-sgd", paths.run_pure, None, "", rules=("sgd",)))
    monkeypatch.setitem(paths.PATHS, "elsewhere",
                        paths.Path("elsewhere", paths.run_pure, None, "", requires=("no_such",)))
    monkeypatch.setitem(paths.PATHS, "on-a-gpu",
                        paths.Path("on-a-gpu", paths.run_pure, None, "", needs=lambda: "no GPU"))
    cells, skipped = check.plan(check.Selection(rules=("sgd", "adam"), backends=("numpy",),
                                                   paths=("only-sgd", "elsewhere", "on-a-gpu")))
    assert {(c.rule, c.path) for c in cells} == {("sgd", "only-sgd")}
    assert [(k.path, k.reason) for k in skipped] == [("elsewhere", "no_such is not installed"),
                                                     ("on-a-gpu", "no GPU")]


def test_every_installed_path_passes_for_two_rules(capsys):
    """The default selection, cut to a per-tensor reduction (NovoGrad) and a transform."""
    status, report, _ = _check(capsys, "--rules", "novograd,gan")
    assert status == 0
    ran = {(c["backend"], c["path"]) for c in report["cells"]}
    assert len(ran) == sum(p.applies_to(n) and not p.unavailable_reason() and p.by_default
                           and p.takes("novograd") for n in backends.available()
                           for p in paths.PATHS.values())
    for cell in report["cells"]:
        assert cell["status"] == "pass" and len(cell["runs"]) == 3, cell


def test_report_json_markdown_and_text(capsys, tmp_path):
    _installed("numpy")
    markdown = tmp_path / "check.md"
    status, report, _ = _check(capsys, "--rules", "mvn,gan", "--backends", "numpy",
                               "--markdown", str(markdown))
    assert status == 0 and report["passed"] is True
    assert report["schema"] == "mvn-core-check/1"
    assert report["problem"] == {"steps": references.STEPS, "seed": references.SEED,
                                 "shapes": [[], [0], [0, 3], [7], [5, 4], [2, 3, 2, 3]]}
    assert report["reference"] == {"kind": "oracle", "goldens": None}
    assert report["libraries"]["numpy"] == np.__version__
    cells = report["cells"]
    assert {(c["rule"], c["dtype"], c["path"]) for c in cells} == {
        (r, d, p) for r in ("mvn", "gan") for d in ("float64", "float32", "float16")
        for p in ("pure", "arrays-adapter")}
    for cell in cells:
        assert set(cell) == {"rule", "backend", "device", "dtype", "path", "status", "bound_used",
                             "max_rel_error", "max_ulps", "diff_vs_pure", "runs"}
        assert cell["status"] == "pass" and 0 <= cell["bound_used"] <= 1
        assert [r["setting"] for r in cell["runs"]] == [c.label for c in cases([cell["rule"]])]
        for run in cell["runs"]:
            assert set(run["worst"]) == {"step", "tensor", "index", "error", "bound"}
            assert run["worst"]["error"] <= run["worst"]["bound"]
            assert 1 <= run["worst"]["step"] <= references.STEPS
        # the adapter calls the pure functions: bit for bit the same trajectory
        assert cell["diff_vs_pure"] == (None if cell["path"] == "pure" else 0.0)
    table = markdown.read_text().splitlines()
    assert table[2].startswith("| rule | backend | device | dtype | path |")
    assert sum(line.startswith("| mvn |") or line.startswith("| gan |") for line in table) == 12
    assert main(["check", "--no-progress", "--rules", "sgd", "--backends", "numpy",
                 "--dtypes", "float64", "--paths", "pure"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[2].split()[:5] == ["rule", "backend", "device", "dtype", "path"]
    assert text[4].split()[:7] == ["sgd", "numpy", "cpu", "float64", "pure", "3/3", "pass"]
    assert text[-1].startswith("PASSED: 1 cells, 3 runs")


def _perturbed(rule, backend, device, dtype, problem, **hyper):
    """The pure path with step 10 of tensor 4 (shape (5, 4)) off by 1e-3 relative."""
    got = paths.run_pure(rule, backend, device, dtype, problem, **hyper)
    got[9][4] = got[9][4] * (1 + 1e-3)
    return got


def test_a_perturbed_path_fails_the_check(capsys, monkeypatch):
    _installed("numpy")
    monkeypatch.setitem(paths.PATHS, "perturbed", paths.Path("perturbed", _perturbed, None, ""))
    status, report, _ = _check(capsys, "--rules", "adam", "--backends", "numpy",
                               "--dtypes", "float32,float64", "--paths", "pure,perturbed")
    assert status == 1 and report["passed"] is False
    for cell in report["cells"]:
        assert cell["status"] == ("fail" if cell["path"] == "perturbed" else "pass")
        if cell["path"] == "perturbed":
            assert cell["bound_used"] > 1 and cell["diff_vs_pure"] > 1e-4
            worst = cell["runs"][0]["worst"]
            assert (worst["step"], worst["tensor"]) == (10, 4)
            assert "exceeds the rounding bound" in cell["runs"][0]["message"]


def test_a_path_that_raises_is_an_error_and_options_reach_the_optimizer(capsys, monkeypatch):
    """A fast path is one registration; here with an option the optimizer refuses."""
    _installed("torch")
    monkeypatch.setitem(paths.PATHS, "torch-bogus", paths.torch_adapter_path("torch-bogus",
                                                                             bogus=True))
    status, report, _ = _check(capsys, "--rules", "sgd", "--backends", "torch", "--dtypes",
                               "float32", "--paths", "torch-bogus")
    assert status == 1
    (cell,) = report["cells"]
    assert cell["status"] == "error" and cell["bound_used"] is None
    assert all("unexpected arguments ['bogus']" in r["message"] for r in cell["runs"])


def test_a_path_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="already registered"):
        paths.register(paths.Path("pure", paths.run_pure, None, ""))


def test_options(capsys):
    for bad in (["--rules", "mvn,nope"], ["--backends", "tensorflow"], ["--dtypes", "float8"],
                ["--paths", "warp"], ["--json", "-", "--markdown", "-"],
                ["--namespace", "numpy", "--backends", "numpy"], ["--steps", "0"],
                ["--reference", "oracle", "--goldens", "."]):
        with pytest.raises(SystemExit) as exit:
            main(["check", *bad])
        assert exit.value.code == 2
    assert "unknown rules ['nope']" in capsys.readouterr().err
    _installed("numpy")
    status, report, _ = _check(capsys, "--rules", "sgd", "--backends", "numpy", "--dtypes",
                               "float64", "--paths", "pure", "--full")
    assert status == 0 and report["problem"]["steps"] == 100
    status, report, _ = _check(capsys, "--backends", "numpy", "--dtypes", "bfloat16")
    assert status == 1 and report["cells"] == []  # nothing checked is no success
    status, report, _ = _check(capsys, "--rules", "sgd", "--backends", "numpy", "--devices",
                               "cuda0")
    assert status == 1 and report["cells"] == []
    assert any("no device named 'cuda0' here" in s["reason"] and "cpu" in s["reason"]
               for s in report["skipped"])  # a name that matched nothing says so


def test_progress_is_one_line_per_cell_without_a_terminal(capsys):
    _installed("numpy")
    assert main(["check", "--rules", "sgd,laprop", "--backends", "numpy", "--dtypes",
                 "float32", "--paths", "pure"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["[1/2] sgd numpy cpu float32 pure: pass",
                   "[2/2] laprop numpy cpu float32 pure: pass"]


def test_ulps_are_spacings_of_the_run_dtype():
    values = np.array([0.0, 1e-40, 6e-8, 0.3, 1.0, 1.5, -3.0, 6e4])
    for dtype in ("float16", "float32", "float64"):
        exact = np.asarray(values, dtype=dtype)  # spacing at numbers of the dtype
        np.testing.assert_array_equal(spacing(dtype, exact), np.abs(np.spacing(exact)))
    np.testing.assert_array_equal(spacing("bfloat16", [1.0, 1.5, 3.0, 0.0, 2.0 ** -130]),
                                  [2.0 ** -7, 2.0 ** -7, 2.0 ** -6, 2.0 ** -133, 2.0 ** -133])


def test_comparison_counts_nan_and_wrong_shapes_as_failures():
    reference = [[np.ones(3), np.zeros(())]]
    bounds = [[np.full(3, 1e-6), np.zeros(())]]
    assert compare([[np.ones(3), np.zeros(())]], reference, bounds, "float32").passed
    with np.errstate(invalid="ignore"):
        nan = compare([[np.array([1.0, np.nan, 1.0]), np.zeros(())]], reference, bounds, "float32")
    assert not nan.passed and nan.bound_used == np.inf and nan.index == (1,)
    exact = compare([[np.ones(3), np.full((), 1e-30)]], reference, bounds, "float32")
    assert not exact.passed and exact.tensor == 1  # a bound of zero allows no error
    shape = compare([[np.ones(4), np.zeros(())]], reference, bounds, "float32")
    assert not shape.passed and "shape (4,) != (3,)" in shape.message


# --- the goldens -------------------------------------------------------------------------------

def test_goldens_equal_the_oracle_bit_for_bit():
    goldens = references.Goldens()
    problem = references.check_problem()
    stored = goldens.problem()
    for ours, theirs in zip(stored.params + sum(stored.grads, []),
                            problem.params + sum(problem.grads, [])):
        assert ours.dtype == np.float64 and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)
    entries = goldens.manifest["trajectories"]
    assert [(e["rule"], e["setting"]) for e in entries] == [(c.rule, c.label) for c in cases()]
    for case in cases():
        expected = references.oracle_reference(case, problem)
        got = goldens.reference(case)
        assert len(got.trajectory) == goldens.steps == references.STEPS
        for ours, theirs in zip(got.trajectory, expected.trajectory):
            for x, y in zip(ours, theirs):
                np.testing.assert_array_equal(x, y, err_msg=case.id)
        assert got.alphas == expected.alphas


def test_goldens_are_small_and_exact_in_every_dtype():
    folder = references.FOLDER
    assert sum(f.stat().st_size for f in folder.iterdir()) < 400_000
    problem = references.Goldens().problem()
    for dtype in ("float16", "float32"):
        for values in problem.params + sum(problem.grads, []):
            np.testing.assert_array_equal(values.astype(dtype).astype(np.float64), values)


def test_writing_the_goldens_is_reproducible(tmp_path):
    first = references.write_goldens(tmp_path / "a")
    second = references.write_goldens(tmp_path / "b")
    assert first == second  # the manifests, with every file's sha256
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def _copy_goldens(tmp_path):
    folder = tmp_path / "goldens"
    shutil.copytree(references.FOLDER, folder)
    return folder


def _alter(folder, name, tensor, step, factor):
    with np.load(folder / name) as stored:
        arrays = dict(stored)
    arrays[tensor][step] *= factor
    return references._write_npz(folder / name, arrays)


def test_a_wrong_golden_fails_the_check(capsys, tmp_path):
    _installed("numpy")
    folder = _copy_goldens(tmp_path)
    digest = _alter(folder, "adam-2.npz", "tensor3", 5, 1.1)
    manifest = json.loads((folder / references.MANIFEST).read_text())
    (entry,) = [e for e in manifest["trajectories"] if e["file"] == "adam-2.npz"]
    entry["sha256"] = digest
    (folder / references.MANIFEST).write_text(json.dumps(manifest))
    status, report, _ = _check(capsys, "--goldens", str(folder), "--rules", "adam",
                               "--backends", "numpy", "--paths", "pure")
    assert status == 1 and report["reference"] == {"kind": "goldens", "goldens": str(folder)}
    for cell in report["cells"]:
        assert [r["status"] for r in cell["runs"]] == ["pass", "fail", "pass"]
        assert cell["runs"][1]["worst"]["step"] == 6


def test_an_altered_golden_file_is_refused(capsys, tmp_path):
    folder = _copy_goldens(tmp_path)
    _alter(folder, "sgd-1.npz", "tensor4", 0, -1.0)
    assert main(["check", "--goldens", str(folder), "--rules", "sgd", "--no-progress"]) == 1
    assert "sgd-1.npz does not match the sha256 of its manifest" in capsys.readouterr().err
    assert main(["check", "--reference", "goldens", "--steps", "21", "--no-progress"]) == 1
    assert f"the goldens hold {references.STEPS} steps; 21" in capsys.readouterr().err


def test_goldens_alone_are_enough(capsys, monkeypatch):
    """With ``--reference goldens`` neither the oracle nor the problem's generator runs."""
    _installed("numpy")

    def unavailable(*args, **kwargs):
        raise AssertionError("the oracle or the problem generator was called")

    for module, name in ((oracle, "trajectory"), (oracle, "transformed"),
                         (references, "make_problem"), (references, "check_problem")):
        monkeypatch.setattr(module, name, unavailable)
    status, report, _ = _check(capsys, "--reference", "goldens", "--rules", "mvn,gan,novograd",
                               "--backends", "numpy", "--paths", "pure")
    assert status == 0 and len(report["cells"]) == 9


def test_the_goldens_command_writes_where_asked(capsys, tmp_path):
    assert main(["goldens", "--out", str(tmp_path), "--steps", "3"]) == 0
    goldens = references.Goldens(tmp_path)
    assert goldens.steps == 3 and len(goldens.manifest["trajectories"]) == len(cases())
    assert str(tmp_path) in capsys.readouterr().out


# --- a user's namespace, and the peers ----------------------------------------------------------

@pytest.mark.parametrize("module", ["array_api_strict", "numpy", "array_api_compat.numpy"])
def test_namespace_given_by_name(capsys, module):
    pytest.importorskip(module)
    status, report, _ = _check(capsys, "--namespace", module, "--rules", "mvn,maxva,gan")
    assert status == 0 and report["selection"]["namespace"] == module
    cells = report["cells"]
    assert {(c["rule"], c["dtype"]) for c in cells} == {
        (r, d) for r in ("mvn", "maxva", "gan") for d in ("float64", "float32")}
    assert {(c["backend"], c["path"], c["status"]) for c in cells} == {(module, "pure", "pass")}


def test_a_namespace_that_is_not_one_checks_nothing(capsys):
    status, report, _ = _check(capsys, "--namespace", "json")
    assert status == 1 and report["cells"] == []
    assert report["skipped"] == [{"backend": "json", "device": "", "path": "all",
                                  "reason": "json is not an Array-API namespace (it has no asarray)"}]


def test_peers_are_in_the_report(capsys):
    _installed("numpy")
    status, report, _ = _check(capsys, "--rules", "sgd", "--backends", "numpy", "--dtypes",
                               "float32", "--paths", "pure", "--peers")
    expected = [c for c in peers.CHECKS if c.rule == "sgd"]
    assert [r["peer"] for r in report["peers"]] == [c.peer for c in expected]
    ran = [r for r in report["peers"] if r["status"] != "skipped"]
    assert status == 0 and all(r["status"] == "pass" and r["dtype"] == "float32" for r in ran)
    assert main(["check", "--rules", "sgd", "--backends", "numpy", "--dtypes", "float32",
                 "--paths", "pure", "--peers", "--no-progress"]) == 0
    assert "peer cross-checks:" in capsys.readouterr().out


def test_a_failing_peer_fails_the_check(capsys, monkeypatch):
    (sgd,) = [c for c in peers.CHECKS if c.peer == "torch.optim.SGD"]
    if sgd.unavailable_reason():
        pytest.skip(sgd.unavailable_reason())

    def misconfigured(problem, dtype, h):
        return sgd.run_peer(problem, dtype, dict(h, momentum=0.8))

    monkeypatch.setattr(peers, "CHECKS", (dataclasses.replace(sgd, run_peer=misconfigured),))
    status, report, _ = _check(capsys, "--rules", "sgd", "--backends", "numpy", "--dtypes",
                               "float32", "--paths", "pure", "--peers")
    assert status == 1 and [r["status"] for r in report["peers"]] == ["fail"]
    assert all(c["status"] == "pass" for c in report["cells"])


def test_the_torch_paths_each_pass_their_exactness(capsys):
    """The generated kernel (the default) is the rule in IEEE arithmetic bit for bit,
    the multi-tensor and reference paths the pure rule on torch bit for bit."""
    _installed("torch")
    status, report, _ = _check(capsys, "--rules", "mvn,novograd", "--backends", "torch",
                               "--dtypes", "float32,bfloat16", "--paths",
                               "pure,torch-adapter,torch-multi-tensor,torch-reference")
    assert status == 0
    assert {c["path"] for c in report["cells"]} == {
        "pure", "torch-adapter", "torch-multi-tensor", "torch-reference"}
    assert all(c["status"] == "pass" for c in report["cells"])


def test_the_optax_paths_each_pass_their_exactness(capsys):
    """The generated kernel (the default on the CPU) is the rule in IEEE arithmetic bit
    for bit, eagerly and jitted (from the scalars as the jitted step computes them)."""
    _installed("jax")
    pytest.importorskip("optax")
    status, report, _ = _check(capsys, "--rules", "adam,novograd", "--backends", "jax",
                               "--dtypes", "float32,bfloat16", "--paths",
                               "pure,optax-adapter,optax-adapter-jit")
    assert status == 0
    assert {c["path"] for c in report["cells"]} == {"pure", "optax-adapter", "optax-adapter-jit"}
    assert all(c["status"] == "pass" for c in report["cells"])


@pytest.mark.parametrize("exact", ["pure", "ieee", "ieee-compiled"])
def test_an_exact_path_that_differs_from_pure_fails(capsys, monkeypatch, exact):
    """A path promised bit for bit (``exact``) fails on any difference from what it
    promises, even one well inside the oracle's bound."""
    _installed("numpy")

    def nudged(rule_name, backend, device, dtype, problem, **hyper):
        out = paths.run_pure(rule_name, backend, device, dtype, problem, **hyper)
        return [[np.nextafter(a, np.inf) for a in step] for step in out]

    monkeypatch.setitem(paths.PATHS, "nudged",
                        paths.Path("nudged", nudged, ("numpy",), "", exact=exact))
    status, report, _ = _check(capsys, "--rules", "adam", "--backends", "numpy",
                               "--dtypes", "float64", "--paths", "pure,nudged")
    assert status == 1
    nudged_cells = [c for c in report["cells"] if c["path"] == "nudged"]
    assert [c["status"] for c in nudged_cells] == ["fail"]
