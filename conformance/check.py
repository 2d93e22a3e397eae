"""The conformance matrix: every rule on every backend, device, dtype and path, against
the float64 oracle or its stored goldens (``mvn-core check``).

A *cell* is one rule on one backend and device, in one dtype, through one path of
:mod:`.paths`; it runs each setting of the rule (:mod:`.cases`) over the portable
problem of :mod:`.references` and compares every coordinate at every step with the
reference within the rounding bound of :mod:`.tolerance` (:mod:`.comparison`).  A cell
passes when every setting does.  Each non-pure path is also compared with the pure
path of its backend, device and dtype (0: the same values), and an exact path fails
on any difference from what it promises (:attr:`.paths.Path.exact`).

What cannot run here (a library, a device or a path's module missing) is listed as
skipped with the reason; it is not a failure.  :func:`run_check` returns a
:class:`Report`; :mod:`.report` prints it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import mvn_core
from mvn_core import backends
from mvn_core.backends import generic

from . import peers as peer_checks
from .cases import Case, cases, rule_names
from .comparison import Comparison, compare, reference_bounds, relative_difference
from .paths import PATHS, Path, as_float64
from .references import (FOLDER, SEED, STEPS, Goldens, Reference, check_problem,
                         oracle_reference)
from .targets import device_name, devices
from .trajectories import ieee_trajectory

DTYPES = ("float64", "float32", "bfloat16", "float16")
REFERENCES = ("oracle", "goldens")


@dataclass(frozen=True)
class Selection:
    """What to check; None selects everything available.

    ``devices`` are names as the table shows them (``cpu``, ``cuda0``, ``no_float64``);
    ``namespace`` names an importable Array-API namespace to check instead of the
    registered backends, through the paths that take any backend (the pure functions).
    ``steps`` beyond the goldens' need ``reference="oracle"``.  Paths registered with
    ``by_default=False`` run when named in ``paths`` or with ``every_path``.
    """

    rules: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None
    devices: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    namespace: str | None = None
    steps: int = STEPS
    seed: int = SEED
    reference: str = "oracle"
    goldens: Any = None  # a folder; None: the goldens shipped with the package
    peers: bool = False
    every_path: bool = False  # also the paths left out by default (slow to compile)

    def __post_init__(self) -> None:
        for name, known in (("rules", rule_names()), ("backends", backends.NAMES),
                            ("dtypes", DTYPES),
                            ("paths", tuple(PATHS))):
            unknown = sorted(set(getattr(self, name) or ()) - set(known))
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; known: {', '.join(known)}")
        if self.reference not in REFERENCES:
            raise ValueError(f"unknown reference {self.reference!r}; known: {', '.join(REFERENCES)}")
        if self.goldens is not None and self.reference != "goldens":
            raise ValueError("golden files are read only with --reference goldens")
        if self.namespace and self.backends:
            raise ValueError("--namespace checks one namespace instead of the backends: "
                             "give one or the other")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


@dataclass(frozen=True)
class CaseResult:
    """One setting of a rule in one cell."""

    case: Case
    status: str  # "pass", "fail" or "error" (the path raised)
    comparison: Comparison | None
    message: str
    diff_vs_pure: float | None  # relative; None: this is the pure path, or it did not run
    seconds: float


@dataclass
class Cell:
    """One rule x backend x device x dtype x path, and the runs of its settings."""

    rule: str
    backend: str
    device: str
    dtype: str
    path: str
    runs: list[CaseResult] = field(default_factory=list)
    target: Any = field(default=None, repr=False, compare=False)  # what the path runs on

    @property
    def label(self) -> str:
        return f"{self.rule} {self.backend} {self.device} {self.dtype} {self.path}"

    @property
    def status(self) -> str:
        statuses = {r.status for r in self.runs}
        return "error" if "error" in statuses else "fail" if "fail" in statuses else "pass"

    @property
    def compared(self) -> list[Comparison]:
        return [r.comparison for r in self.runs if r.comparison is not None]

    @property
    def bound_used(self) -> float:
        return max((c.bound_used for c in self.compared), default=float("nan"))

    @property
    def max_rel_error(self) -> float:
        return max((c.max_rel_error for c in self.compared), default=float("nan"))

    @property
    def max_ulps(self) -> float:
        return max((c.max_ulps for c in self.compared), default=float("nan"))

    @property
    def diff_vs_pure(self) -> float | None:
        values = [r.diff_vs_pure for r in self.runs if r.diff_vs_pure is not None]
        return max(values) if values else None

    @property
    def passed_runs(self) -> int:
        return sum(r.status == "pass" for r in self.runs)


@dataclass(frozen=True)
class Skipped:
    """A backend, device or path that cannot run here, with the reason."""

    backend: str
    device: str
    path: str
    reason: str


@dataclass
class Report:
    selection: Selection
    cells: list[Cell]
    skipped: list[Skipped]
    shapes: list[tuple]  # of the problem's tensors
    peers: list | None = None  # peers.PeerResult, when asked for
    seconds: float = 0.0

    @property
    def failed_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.status != "pass"]

    @property
    def failed_peers(self) -> list:
        return [r for r in self.peers or () if not r.skipped and not r.passed]

    @property
    def passed(self) -> bool:
        """Every cell and peer check passed, and something was checked at all."""
        checked = any(c.runs for c in self.cells) or any(not r.skipped for r in self.peers or ())
        return checked and not self.failed_cells and not self.failed_peers


# --- planning ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    backend: Any  # a backend name, or a generic backend object (--namespace)
    label: str
    device: Any
    dtypes: tuple[str, ...]


def plan(selection: Selection) -> tuple[list[Cell], list[Skipped]]:
    """The cells to run, in the table's order, and what is skipped."""
    targets, skipped = _targets(selection)
    paths = [p for p in PATHS.values() if p.name in selection.paths] if selection.paths else \
        [p for p in PATHS.values() if p.by_default or selection.every_path]
    reasons = {p.name: p.unavailable_reason() for p in paths}
    runnable = {}
    for target in targets:
        applicable = [p for p in paths if _applies(p, target.label, selection)]
        skipped += [Skipped(target.label, _device(target), p.name, reasons[p.name])
                    for p in applicable if reasons[p.name]]
        runnable[target] = [p for p in applicable if not reasons[p.name]]
    cells = [Cell(rule, target.label, _device(target), dtype, path.name, target=target)
             for rule in selection.rules or rule_names() for target in targets
             for dtype in target.dtypes for path in runnable[target] if path.takes(rule)]
    return cells, skipped


def _applies(path: Path, backend: str, selection: Selection) -> bool:
    return path.backends is None if selection.namespace else path.applies_to(backend)


def _targets(selection: Selection) -> tuple[list[_Target], list[Skipped]]:
    if selection.namespace:
        libraries = [(selection.namespace, generic.from_module(selection.namespace))]
    else:
        libraries = [(n, backends.get(n)) for n in backends.NAMES
                     if selection.backends is None or n in selection.backends]
    targets, skipped, seen = [], [], set()
    for label, lib in libraries:
        reason = lib.unavailable_reason()
        if reason:
            skipped.append(Skipped(label, "", "all", reason))
            continue
        if label == "jax":
            lib.enable_x64()  # float64 exists only with x64 on
        for device in lib.devices() if selection.namespace else devices(label):
            name = device_name(device) or "default"
            seen.add(name)
            if selection.devices is not None and name not in selection.devices:
                continue
            supported = lib.dtypes(device)
            dtypes = tuple(d for d in DTYPES if d in supported
                           and (selection.dtypes is None or d in selection.dtypes))
            backend = lib if selection.namespace else label
            targets.append(_Target(backend, label, device, dtypes))
    for name in sorted(set(selection.devices or ()) - seen):
        skipped.append(Skipped("", name, "all", f"no device named {name!r} here; the "
                               f"selected backends have {', '.join(sorted(seen)) or 'none'}"))
    return targets, skipped


def _device(target: _Target) -> str:
    return device_name(target.device) or "default"


# --- running ----------------------------------------------------------------------------

def run_check(selection: Selection = Selection(), progress: Callable | None = None) -> Report:
    """Run the selected matrix (and the peer checks, if selected).

    ``progress(done, total, cell)`` is called after each cell.
    """
    started = time.perf_counter()
    cells, skipped = plan(selection)
    source = _ReferenceSource(selection)
    pure_runs: dict = {}
    for done, cell in enumerate(cells, start=1):
        cell.runs = [_run_case(cell, case, source, pure_runs) for case in cases([cell.rule])]
        if progress:
            progress(done, len(cells), cell)
    peers = _run_peers(selection) if selection.peers else None
    shapes = [tuple(p.shape) for p in source.problem.params]
    return Report(selection, cells, skipped, shapes, peers, time.perf_counter() - started)


class _ReferenceSource:
    """The problem, and per setting the reference trajectory and its bounds per dtype
    (each computed once)."""

    def __init__(self, selection: Selection):
        self.steps = selection.steps
        if selection.reference == "goldens":
            self.goldens = Goldens(selection.goldens or FOLDER)
            self.problem = self.goldens.problem(selection.steps)
        else:
            self.goldens = None
            self.problem = check_problem(selection.steps, selection.seed)
        self._references: dict = {}
        self._bounds: dict = {}

    def reference(self, case: Case) -> Reference:
        if case.id not in self._references:
            self._references[case.id] = (self.goldens.reference(case, self.steps) if self.goldens
                                         else oracle_reference(case, self.problem))
        return self._references[case.id]

    def bounds(self, case: Case, dtype: str) -> list:
        key = (case.id, dtype)
        if key not in self._bounds:
            reference = self.reference(case)
            self._bounds[key] = reference_bounds(case.rule, case.hyper, dtype, self.problem,
                                                 reference.trajectory, reference.alphas)
        return self._bounds[key]


def _run_case(cell: Cell, case: Case, source: _ReferenceSource, pure_runs: dict) -> CaseResult:
    reference, bounds = source.reference(case), source.bounds(case, cell.dtype)
    path = PATHS[cell.path]
    started = time.perf_counter()
    try:
        got = path.run(case.rule, cell.target.backend, cell.target.device, cell.dtype,
                       source.problem, **case.hyper)
    except Exception as error:  # a path or namespace that cannot run this: an error row
        return CaseResult(case, "error", None, f"{type(error).__name__}: {error}", None,
                          time.perf_counter() - started)
    seconds = time.perf_counter() - started
    comparison = compare(got, reference.trajectory, bounds, cell.dtype)
    key = (case.id, cell.backend, cell.device, cell.dtype)
    if cell.path == "pure":
        pure_runs[key] = got
        vs_pure = None
    else:
        vs_pure = relative_difference(got, pure_runs[key]) if key in pure_runs else None
    status = "pass" if comparison.passed else "fail"
    message = comparison.message
    promise = path.promise(cell.device)
    if promise == "pure" and vs_pure:  # promised bit for bit, and it is not
        status = "fail"
        message = f"differs from the pure path by {vs_pure:.2g} (relative); it must be identical"
    elif promise in ("ieee", "ieee-compiled"):
        vs_ieee = relative_difference(got, _ieee_run(case, cell, source.problem, pure_runs,
                                                     compiled=promise == "ieee-compiled"))
        if vs_ieee:
            status = "fail"
            message = (f"differs from the rule in IEEE arithmetic by {vs_ieee:.2g} "
                       "(relative); it must be identical")
    return CaseResult(case, status, comparison, message, vs_pure, seconds)


def _ieee_run(case: Case, cell: Cell, problem, pure_runs: dict, compiled: bool = False) -> list:
    """The rule in IEEE arithmetic on the cell's backend (a transform, which no kernel
    runs, is its pure run, compiled where ``compiled``), computed once per case, backend,
    device and dtype (and ``compiled``: from the step's scalars as the backend's compile
    hook computes them)."""
    key = ("ieee", case.id, cell.backend, cell.device, cell.dtype, compiled)
    if key not in pure_runs:
        if mvn_core.rules[case.rule].tensor_rule is None:
            pure = PATHS["pure-jit" if compiled else "pure"]
            pure_runs[key] = pure.run(case.rule, cell.target.backend, cell.target.device,
                                               cell.dtype, problem, **case.hyper)
        else:
            pure_runs[key] = as_float64(ieee_trajectory(
                case.rule, cell.target.backend, problem, dtype=cell.dtype,
                device=cell.target.device, compiled=compiled, **case.hyper))
    return pure_runs[key]


def _run_peers(selection: Selection) -> list:
    dtypes = [d for d in peer_checks.DTYPES if selection.dtypes is None or d in selection.dtypes]
    checks = [c for c in peer_checks.CHECKS if selection.rules is None or c.rule in selection.rules]
    return peer_checks.run_peer_checks(dtypes=dtypes, checks=checks)
