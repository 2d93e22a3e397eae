"""The reports of ``mvn-core check``: a text table, the same table in Markdown, and JSON.

One row per cell (rule x backend/device x dtype x path).  The columns:

- ``runs``: the settings of the rule that passed, of those run (:mod:`.cases`);
- ``result``: pass, FAIL (some coordinate left its rounding bound) or ERROR (the
  path raised);
- ``bound used``: the largest error divided by its rounding bound, over every
  coordinate, step and setting: 1 is the limit;
- ``max rel err``: the largest norm-wise relative error of a tensor at a step;
- ``max ULPs``: the largest error in units in the last place of the run's dtype;
- ``vs pure``: for a path other than the pure functions, its largest relative
  difference from the pure path on the same backend, device and dtype, measured as
  ``max rel err`` ("identical": the same values at every step).

The JSON report (schema :data:`SCHEMA`) holds the same cells with every setting's
numbers and where its error came closest to the bound.
"""

from __future__ import annotations

import importlib.metadata
import math

import mvn_core

from . import peers as peer_checks
from .check import Cell, Report
from .comparison import Comparison

SCHEMA = "mvn-core-check/1"
LIBRARIES = ("numpy", "array-api-strict", "array-api-compat", "torch", "jax", "jaxlib",
             "optax", "cupy")
COLUMNS = ("rule", "backend", "device", "dtype", "path", "runs", "result", "bound used",
           "max rel err", "max ULPs", "vs pure")
RIGHT = {"runs", "bound used", "max rel err", "max ULPs"}


def rows(report: Report) -> list[tuple[str, ...]]:
    return [(c.rule, c.backend, c.device, c.dtype, c.path, f"{c.passed_runs}/{len(c.runs)}",
             _result(c), _number(c.bound_used, ".3f"), _number(c.max_rel_error, ".1e"),
             _number(c.max_ulps, ".3g"), _vs_pure(c)) for c in report.cells]


def header_lines(report: Report) -> list[str]:
    s = report.selection
    reference = ("the float64 oracle" if s.reference == "oracle"
                 else f"the golden trajectories in {s.goldens or 'the package'}")
    shapes = ", ".join(map(str, report.shapes))
    return [f"mvn-core check: every rule against {reference}; {s.steps} steps, seed {s.seed}, "
            f"tensors of shapes {shapes}"]


def summary_line(report: Report) -> str:
    runs = [r for c in report.cells for r in c.runs]
    counts = {k: sum(r.status == k for r in runs) for k in ("pass", "fail", "error")}
    line = (f"{len(report.cells)} cells, {len(runs)} runs: {counts['pass']} passed, "
            f"{counts['fail']} failed, {counts['error']} errors; "
            f"{len(report.skipped)} skipped")
    if report.peers is not None:
        ran = [r for r in report.peers if not r.skipped]
        line += (f"; peers: {sum(r.passed for r in ran)} of {len(ran)} passed, "
                 f"{len(report.peers) - len(ran)} skipped")
    verdict = "PASSED" if report.passed else "FAILED"
    return f"{verdict}: {line} ({report.seconds:.0f} s)"


def text_lines(report: Report) -> list[str]:
    """The table as plain text, then what failed, what was skipped and the peer checks."""
    table = [COLUMNS, *rows(report)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]

    def line(row):
        cells = [v.rjust(w) if name in RIGHT else v.ljust(w)
                 for name, v, w in zip(COLUMNS, row, widths)]
        return "  ".join(cells).rstrip()

    out = header_lines(report) + ["", line(COLUMNS), "-" * len(line(COLUMNS))]
    out += [line(row) for row in table[1:]]
    out += _details(report)
    if report.peers is not None:
        out += ["", "peer cross-checks:", *peer_checks.report_lines(report.peers)]
    return out + ["", summary_line(report)]


def markdown(report: Report) -> str:
    out = [f"{header_lines(report)[0]}", "",
           "| " + " | ".join(COLUMNS) + " |",
           "| " + " | ".join("---:" if c in RIGHT else "---" for c in COLUMNS) + " |"]
    out += ["| " + " | ".join(_md(v) for v in row) + " |" for row in rows(report)]
    details = _details(report)
    if details:
        out += ["", "```", *details[1:], "```"]
    if report.peers is not None:
        out += ["", "Peer cross-checks:", "", "```", *peer_checks.report_lines(report.peers), "```"]
    return "\n".join(out + ["", summary_line(report)]) + "\n"


def as_json(report: Report) -> dict:
    s = report.selection
    return _finite({
        "schema": SCHEMA,
        "mvn_core": mvn_core.__version__,
        "passed": report.passed,
        "reference": {"kind": s.reference,
                      "goldens": None if s.reference == "oracle" else str(s.goldens or "package")},
        "problem": {"steps": s.steps, "seed": s.seed,
                    "shapes": [list(shape) for shape in report.shapes]},
        "selection": {"rules": s.rules, "backends": s.backends, "devices": s.devices,
                      "dtypes": s.dtypes, "paths": s.paths, "namespace": s.namespace,
                      "peers": s.peers},
        "libraries": library_versions(),
        "seconds": report.seconds,
        "cells": [_cell_json(c) for c in report.cells],
        "skipped": [vars(k) for k in report.skipped],
        "peers": None if report.peers is None else [_peer_json(r) for r in report.peers],
    })


def _cell_json(cell: Cell) -> dict:
    return {
        "rule": cell.rule, "backend": cell.backend, "device": cell.device, "dtype": cell.dtype,
        "path": cell.path, "status": cell.status, "bound_used": cell.bound_used,
        "max_rel_error": cell.max_rel_error, "max_ulps": cell.max_ulps,
        "diff_vs_pure": cell.diff_vs_pure,
        "runs": [{
            "setting": r.case.label, "hyperparameters": r.case.hyper, "status": r.status,
            **_comparison_json(r.comparison), "diff_vs_pure": r.diff_vs_pure,
            "message": r.message, "seconds": r.seconds,
        } for r in cell.runs],
    }


def _comparison_json(c: Comparison | None) -> dict:
    if c is None:
        return {"bound_used": None, "max_rel_error": None, "max_ulps": None, "worst": None}
    return {"bound_used": c.bound_used, "max_rel_error": c.max_rel_error, "max_ulps": c.max_ulps,
            "worst": {"step": c.step, "tensor": c.tensor, "index": list(c.index),
                      "error": c.error, "bound": c.bound}}


def _peer_json(r) -> dict:
    status = "skipped" if r.skipped else "pass" if r.passed else "fail"
    return {"rule": r.rule, "setting": r.label, "peer": r.peer, "dtype": r.dtype,
            "status": status, "max_error": r.max_error, "tolerance": r.tolerance,
            "where": r.where, "largest": r.largest, "skipped": r.skipped}


def _finite(value):
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _details(report: Report) -> list[str]:
    out = []
    failed = [(c, r) for c in report.failed_cells for r in c.runs if r.status != "pass"]
    if failed:
        out += ["", "failures:"]
        out += [f"  {c.label} [{r.case.label}]: {r.message}" for c, r in failed]
    if report.skipped:
        out += ["", "skipped:"]
        out += [f"  {k.backend}{' ' + k.device if k.device else ''} ({k.path} paths): {k.reason}"
                if k.path == "all" else f"  {k.backend} {k.device} {k.path}: {k.reason}"
                for k in report.skipped]
    return out


def _result(cell: Cell) -> str:
    return {"pass": "pass", "fail": "FAIL", "error": "ERROR"}[cell.status]


def _vs_pure(cell: Cell) -> str:
    difference = cell.diff_vs_pure
    if cell.path == "pure":
        return ""
    if difference is None:
        return "-"
    return "identical" if difference == 0 else _number(difference, ".1e")


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else "inf" if math.isinf(value) else format(value, spec)


def _md(value: str) -> str:
    return value.replace("|", "\\|") or " "


def library_versions(names=LIBRARIES) -> dict:
    """The installed version of each distribution in ``names``; None where it is not."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
