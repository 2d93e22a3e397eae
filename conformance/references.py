"""What a run is compared with: the float64 oracle, or the golden trajectories it stored.

The goldens are the oracle's trajectories of every setting of :mod:`.cases` on the
portable problem (:func:`.problems.portable`: exact in every dtype, so one float64
trajectory serves runs in float16, bfloat16, float32 and float64), kept in
``goldens/`` beside this module and shipped in the wheel:

- ``problem.npz``: ``params{i}`` (the initial parameters) and ``grads{i}`` (shape
  ``(steps, *shape)``) for each tensor ``i``;
- one ``<rule>-<k>.npz`` per setting: ``tensor{i}``, the parameters after each step
  (for GAN, the transformed gradients) and, for GAN, ``alpha``, the oracle's global
  factor per step (NaN where no tensor is eligible);
- ``manifest.json``: the seed, steps and shapes, and per file its rule, setting, full
  hyperparameters and sha256.

With them, ``mvn-core check --reference goldens`` needs neither the oracle nor the
random generator that made the problem: only these files, NumPy and the library under
test.  ``mvn-core goldens`` writes them again; the files are byte-for-byte
reproducible (fixed zip timestamps), so regenerating unchanged goldens changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import zipfile
from typing import NamedTuple

import numpy as np

from . import oracle
from .cases import Case, cases
from .problems import SHAPES, Problem, make_problem, portable

STEPS = 20
SEED = 20261123
FOLDER = pathlib.Path(__file__).resolve().parent / "goldens"
MANIFEST = "manifest.json"
PROBLEM = "problem.npz"
FORMAT = 1
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can hold: no build time in the bytes


class GoldenError(ValueError):
    """The golden files are missing, altered, or do not hold what is asked of them."""


class Reference(NamedTuple):
    """A float64 reference trajectory (per step, per tensor) and, for GAN, the oracle's
    global factor per step (None where no tensor was eligible)."""

    trajectory: list
    alphas: list | None = None


def check_problem(steps: int = STEPS, seed: int = SEED) -> Problem:
    """The problem ``mvn-core check`` runs (the goldens' for the default steps)."""
    return portable(make_problem(steps, seed=seed))


def oracle_reference(case: Case, problem: Problem) -> Reference:
    trajectory = oracle.trajectory(case.rule, problem.params, problem.grads, **case.hyper)
    if oracle.ENTRIES[case.rule].transform is None:
        return Reference(trajectory)
    alphas = [oracle.transformed(case.rule, grads, **case.hyper)[1] for grads in problem.grads]
    return Reference(trajectory, alphas)


def full_hyperparameters(case: Case) -> dict:
    """The case's hyperparameters with the defaults of docs/algorithms.md filled in."""
    return dict(oracle.DEFAULTS[case.rule], **case.hyper)


# --- writing ---------------------------------------------------------------------------

def write_goldens(folder=FOLDER, steps: int = STEPS, seed: int = SEED) -> dict:
    """Compute every setting's trajectory with the oracle and write the golden files
    and their manifest into ``folder``; returns the manifest."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    problem = check_problem(steps, seed)
    problem_arrays = {f"params{i}": p for i, p in enumerate(problem.params)}
    problem_arrays.update({f"grads{i}": np.stack([g[i] for g in problem.grads])
                           for i in range(len(problem.params))})
    manifest = {
        "format": FORMAT, "written_by": "mvn-core goldens",
        "seed": seed, "steps": steps, "shapes": [list(s) for s in SHAPES],
        "exact_in": ["float16", "bfloat16", "float32", "float64"],
        "problem": {"file": PROBLEM, "sha256": _write_npz(folder / PROBLEM, problem_arrays)},
        "trajectories": [],
    }
    numbering: dict[str, int] = {}
    for case in cases():
        numbering[case.rule] = numbering.get(case.rule, 0) + 1
        name = f"{case.rule}-{numbering[case.rule]}.npz"
        digest = _write_npz(folder / name, _trajectory_arrays(oracle_reference(case, problem)))
        manifest["trajectories"].append({
            "rule": case.rule, "setting": case.label, "hyperparameters": full_hyperparameters(case),
            "file": name, "sha256": digest})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _trajectory_arrays(reference: Reference) -> dict:
    tensors = len(reference.trajectory[0])
    arrays = {f"tensor{i}": np.stack([step[i] for step in reference.trajectory])
              for i in range(tensors)}
    if reference.alphas is not None:
        arrays["alpha"] = np.array([np.nan if a is None else a for a in reference.alphas])
    return arrays


def _write_npz(path: pathlib.Path, arrays: dict) -> str:
    """``numpy.savez_compressed`` with fixed timestamps; returns the file's sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            archive.writestr(info, member.getvalue())
    data = buffer.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


# --- reading ---------------------------------------------------------------------------

class Goldens:
    """The golden files of ``folder``, checked against their manifest's sha256 as they
    are read."""

    def __init__(self, folder=FOLDER):
        self.folder = pathlib.Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise GoldenError(f"no {MANIFEST} in {self.folder}: write the goldens with "
                              "'mvn-core goldens'")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise GoldenError(f"{path} has format {self.manifest.get('format')!r}; this "
                              f"version reads format {FORMAT}")
        self.steps = int(self.manifest["steps"])
        self._entries = {(e["rule"], e["setting"]): e for e in self.manifest["trajectories"]}

    def problem(self, steps: int | None = None) -> Problem:
        """The stored problem, cut to its first ``steps`` steps."""
        steps = self._checked_steps(steps)
        arrays = self._load(self.manifest["problem"])
        n = len(self.manifest["shapes"])
        params = [arrays[f"params{i}"] for i in range(n)]
        grads = [[arrays[f"grads{i}"][t] for i in range(n)] for t in range(steps)]
        return Problem(params, grads)

    def reference(self, case: Case, steps: int | None = None) -> Reference:
        """The stored trajectory of ``case``, cut to its first ``steps`` steps."""
        steps = self._checked_steps(steps)
        entry = self._entries.get((case.rule, case.label))
        if entry is None:
            raise GoldenError(f"the goldens in {self.folder} hold no trajectory of {case.id}: "
                              "write them again with 'mvn-core goldens'")
        if entry["hyperparameters"] != full_hyperparameters(case):
            raise GoldenError(f"the goldens' {case.id} ({entry['file']}) were made with "
                              f"{entry['hyperparameters']}, not {full_hyperparameters(case)}")
        arrays = self._load(entry)
        n = len(self.manifest["shapes"])
        trajectory = [[arrays[f"tensor{i}"][t] for i in range(n)] for t in range(steps)]
        if "alpha" not in arrays:
            return Reference(trajectory)
        alphas = [None if np.isnan(a) else float(a) for a in arrays["alpha"][:steps]]
        return Reference(trajectory, alphas)

    def _checked_steps(self, steps: int | None) -> int:
        if steps is None:
            return self.steps
        if not 1 <= steps <= self.steps:
            raise GoldenError(f"the goldens hold {self.steps} steps; {steps} were asked for")
        return steps

    def _load(self, entry: dict) -> dict:
        path = self.folder / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as error:
            raise GoldenError(f"cannot read {path}: {error}") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise GoldenError(f"{path} does not match the sha256 of its manifest: the file "
                              "was altered; write the goldens again with 'mvn-core goldens'")
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
