"""Layout and packaging: import names, the framework-free core, the wheel's contents."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FRAMEWORKS = ("numpy", "torch", "jax", "jaxlib", "cupy", "optax", "array_api_strict", "tensorflow",
              "keras")
PACKAGES = ("mvn_core", "mvn_core.backends", "mvn_core.adapters", "mvn_core.conformance",
            "mvn_core.bench", "mvn_core.demo")


def _python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, check=True).stdout


def test_importing_the_core_loads_no_framework(tmp_path):
    loaded = _python("import sys, mvn_core, mvn_core.backends; "
                     f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))", tmp_path)
    assert loaded.strip() == "[]"


def test_the_core_sources_import_no_framework():
    for path in (ROOT / "core").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FRAMEWORKS, f"{path.name} imports {name}"


def test_installed_import_names(tmp_path):
    """Only ``mvn_core`` is importable at top level; the mapped packages live under it."""
    out = _python(
        "import importlib.util as u\n"
        f"print([u.find_spec(n) is not None for n in {PACKAGES!r}])\n"
        "print([u.find_spec(n) is None for n in ('backends', 'adapters', 'conformance', 'core', 'bench', 'demo')])\n"
        "import mvn_core.backends as b; print(b.__file__)", tmp_path)
    found, absent, backends_file = out.splitlines()
    assert found == str([True] * len(PACKAGES)) and absent == str([True] * 6)
    assert pathlib.Path(backends_file).parent.name == "backends"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("mvn_core-*.whl")
    return path


def test_wheel_holds_only_the_mvn_core_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"mvn_core"}
    for expected in ("mvn_core/mvn.py", "mvn_core/backends/numpy.py",
                     "mvn_core/adapters/__init__.py", "mvn_core/conformance/oracle/mvn.py",
                     "mvn_core/bench/run.py", "mvn_core/demo/run.py", "mvn_core/cli.py"):
        assert expected in names
    metadata = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mvn-core = mvn_core.cli:main" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_wheel_holds_the_goldens(wheel):
    """``mvn-core check --reference goldens`` needs every file its manifest names."""
    archive = zipfile.ZipFile(wheel)
    folder = "mvn_core/conformance/goldens/"
    manifest = json.loads(archive.read(folder + "manifest.json"))
    files = [manifest["problem"]["file"]] + [e["file"] for e in manifest["trajectories"]]
    assert len(files) > 20
    for name in files:
        assert folder + name in archive.namelist()
    stored = sorted(n for n in archive.namelist() if n.startswith(folder))
    assert stored == sorted(folder + name for name in files + ["manifest.json"])


# What a fresh process imports: every mapped package, the oracle and the goldens.
IMPORTS = ("import mvn_core, mvn_core.backends, mvn_core.adapters.torch, mvn_core.bench.run, "
           "mvn_core.demo.run, mvn_core.conformance.oracle as o\n"
           "from mvn_core.conformance.references import Goldens\n"
           "print(mvn_core.__file__); print(mvn_core.adapters.torch.__file__); print(o.__file__)\n"
           "print(mvn_core.bench.run.__file__); g = Goldens(); g.problem(); print(g.folder)")
# Working directories that once shadowed the installed package (the repository root
# held a folder named mvn_core), and one unrelated to the repository.
PLACES = ("repository root", "core folder", "elsewhere")


def _place(name, tmp_path):
    return {"repository root": ROOT, "core folder": ROOT / "core", "elsewhere": tmp_path}[name]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A regular install of the wheel, in a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    return target


@pytest.mark.parametrize("place", PLACES)
def test_regular_install_gives_the_same_package_from_any_directory(installed, tmp_path, place):
    target = installed
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", IMPORTS], cwd=_place(place, tmp_path), env=env,
                         capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) == 5
    for line in out.splitlines():
        assert line.startswith(str(target))


def test_editable_install_gives_the_same_files_from_any_directory(tmp_path):
    """The tests run on the editable install: one set of files, wherever Python starts."""
    seen = {place: _python(IMPORTS, _place(place, tmp_path)) for place in PLACES}
    assert len(set(seen.values())) == 1
    files = seen["elsewhere"].splitlines()
    assert pathlib.Path(files[0]).parent == ROOT / "core"
    assert pathlib.Path(files[1]).parent == ROOT / "adapters"
