"""The report of ``mvn-core bench``: the speed targets computed from its rows, where
the figures come from (machine, load, versions), the tables as text, and JSON."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from typing import Callable, NamedTuple

import mvn_core

from .timing import OURS, SETTLE, SLOW_SHARE
from mvn_core.conformance.report import library_versions

PER_COORDINATE = tuple(name for name, rule in mvn_core.rules.items()
                       if rule.kind == "optimizer" and rule.per_coordinate)


@dataclass(frozen=True)
class SpeedTarget:
    """A figure of the speed targets, computed from the figures of ``backend`` on
    devices of ``kind``; met when ``value <= limit`` (``at_most``) or ``value >=
    limit``.  ``value(figures)`` reads :class:`Figures`.  Printed, never asserted:
    timings depend on the machine."""

    text: str
    backend: str
    kind: str
    limit: float
    at_most: bool
    value: Callable[["Figures"], float | None]
    unit: str = "ratio"  # "ratio", "share" (of the copy bandwidth) or "s"


class Figures(NamedTuple):
    """One backend's figures on one device: the rows at the run's N and K, the scaling
    rows, and the first steps (cold and warm kernel cache)."""

    rows: list[dict]
    scaling: list[dict]
    first_steps: list[dict]


def _ours(rows, rule, path) -> dict | None:
    return next((r for r in rows if r["implementation"] == OURS and r["rule"] == rule
                 and r["path"] == path and r["ms_per_step"] is not None), None)


def _ratio(rule, path):
    """Our row's time over the baseline's, at the run's N and K."""
    def value(f: Figures):
        row = _ours(f.rows, rule, path)
        return row["ratio_to_baseline"] if row else None
    return value


def _ratio_at(rule, path, k):
    """Our time over the baseline's in the scaling rows at ``k`` tensors."""
    def value(f: Figures):
        row = _ours([r for r in f.scaling if r["sweep"] == "k" and r["k"] == k], rule, path)
        return row["ratio_to_baseline"] if row else None
    return value


def _least_share(path):
    """The least share of the copy bandwidth among the per-coordinate rules' rows."""
    def value(f: Figures):
        shares = [r["fraction_of_copy"] for r in (_ours(f.rows, n, path) for n in PER_COORDINATE)
                  if r and r["fraction_of_copy"] is not None]
        return min(shares) if len(shares) == len(PER_COORDINATE) else None
    return value


def _share(rule, path):
    def value(f: Figures):
        row = _ours(f.rows, rule, path)
        return row["fraction_of_copy"] if row else None
    return value


def _first_step(cache):
    def value(f: Figures):
        return f.first_steps[0][f"{cache}_s"] if f.first_steps else None
    return value


TARGETS = (
    SpeedTarget("MVN-Grad's default step / AdamW(fused=True)", "torch", "cpu", 1.35, True,
           _ratio("mvn", "kernel")),
    SpeedTarget("MaxVA's default step / AdamW(fused=True)", "torch", "cpu", 1.7, True,
           _ratio("maxva", "kernel")),
    SpeedTarget("least share of the copy bandwidth of a per-coordinate rule (default path)",
           "torch", "cpu", 0.8, False, _least_share("kernel"), "share"),
    SpeedTarget("2M params in 1,000 tensors: MVN-Grad / AdamW(fused=True)", "torch", "cpu", 0.5,
           True, _ratio_at("mvn", "kernel", 1_000)),
    SpeedTarget("2M params in 10,000 tensors: MVN-Grad / AdamW(fused=True)", "torch", "cpu", 0.1,
           True, _ratio_at("mvn", "kernel", 10_000)),
    SpeedTarget("MVN-Grad's first step, empty kernel cache (s)", "torch", "cpu", 3.0, True,
           _first_step("cold"), "s"),
    SpeedTarget("MVN-Grad's first step, warm kernel cache (s)", "torch", "cpu", 0.2, True,
           _first_step("warm"), "s"),
    SpeedTarget("mvn_grad / optax.adam, both jitted", "jax", "cpu", 1.0, True, _ratio("mvn", "jit")),
    SpeedTarget("2M params in 1,000 tensors: mvn_grad / optax.adam", "jax", "cpu", 1.0, True,
           _ratio_at("mvn", "jit", 1_000)),
    SpeedTarget("least share of the copy bandwidth of a per-coordinate rule", "numpy", "cpu", 0.8,
           False, _least_share("arrays"), "share"),
    SpeedTarget("MVN-Grad's share of the copy bandwidth (default path)", "torch", "gpu", 0.85, False,
           _share("mvn", "kernel"), "share"),
    SpeedTarget("mvn_grad's share of the copy bandwidth, jitted", "jax", "gpu", 0.85, False,
           _share("mvn", "jit"), "share"),
    SpeedTarget("MVN-Grad's share of the copy bandwidth (fused=True)", "cupy", "gpu", 0.85, False,
           _share("mvn", "fused"), "share"),
)


def targets(report: dict) -> list[dict]:
    """Each target whose figures were measured, per device: its value and whether it
    is met."""
    out = []
    for t in TARGETS:
        def of(entries, device):
            return [e for e in entries if e["backend"] == t.backend and e["device"] == device]

        devices = sorted({r["device"] for r in report["rows"] + report["scaling"]
                          if r["backend"] == t.backend and r["kind"] == t.kind})
        entry = {"target": f"{t.kind.upper()}, {_library(t.backend)}: {t.text}",
                 "limit": t.limit, "comparison": "<=" if t.at_most else ">=", "unit": t.unit}
        found = False
        for device in devices:
            figures = Figures(of(report["rows"], device), of(report["scaling"], device),
                              of(report.get("first_steps", []), device))
            value = t.value(figures)
            if value is not None:
                met = value <= t.limit if t.at_most else value >= t.limit
                out.append(dict(entry, device=device, value=value, met=met))
                found = True
        if not found:  # not measured in this run (e.g. no GPU, or not selected)
            out.append(dict(entry, device=None, value=None, met=None))
    return out


def _library(backend: str) -> str:
    return {"torch": "PyTorch", "jax": "JAX", "numpy": "NumPy", "cupy": "CuPy"}[backend]


# --- the report -------------------------------------------------------------------------

def environment() -> dict:
    """Where the figures come from: machine, load, threads, library versions."""
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": _cpu_model(), "cpus": os.cpu_count(), "load_average": load_average(),
            "thread_settings": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                          "XLA_FLAGS") if k in os.environ},
            "libraries": {name: version for name, version in
                          library_versions(DISTRIBUTIONS).items() if version}}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


DISTRIBUTIONS = ("numpy", "torch", "jax", "jaxlib", "optax", "cupy-cuda12x", "cupy-cuda11x",
                 "cupy", "timm", "adabelief-pytorch")


COLUMNS = (("rule", "<9"), ("implementation", "<27"), ("path", "<12"), ("ms/step", ">9"),
           ("1st step ms", ">11"), ("x base", ">6"), ("GB/s", ">7"), ("% copy", ">6"),
           ("B/param", ">7"), ("state B/param", ">13"), ("peak MB", ">8"), ("temp MB", ">8"),
           ("growth kB", ">9"))


def report_lines(report: dict) -> list[str]:
    """The report as text: how to read it, a table per backend and device, what was
    skipped, the scaling tables and the targets."""
    lines = _header(report["config"], report["environment"])
    for copy in report["copy"]:
        rows = [r for r in report["rows"]
                if (r["backend"], r["device"]) == (copy["backend"], copy["device"])]
        lines += ["", _group_title(copy, rows), _table_header()]
        lines += [_table_line(r) for r in rows]
    if report["skipped"]:
        lines += ["", "skipped:"]
        lines += [f"  {s['backend']} {s['kind']}{' ' + s['case'] if s['case'] else ''}: "
                  f"{s['reason']}" for s in report["skipped"]]
    lines += scaling_lines(report["scaling"])
    if report["targets"]:
        lines += ["", "targets (figures of this run, not tests):"]
        lines += [_target_line(t) for t in report["targets"]]
    return lines


def _header(config: dict, env: dict) -> list[str]:
    warmup = max(config["warmup"], 1 + SETTLE)  # measure() needs as many
    slow = (max(2, config["repeat"] // SLOW_SHARE),
            max(2, config["warmup"] // SLOW_SHARE, 1 + SETTLE))
    threads = [f"torch threads {env['torch_threads']}"] if "torch_threads" in env else []
    threads += [f"{k}={v}" for k, v in env["thread_settings"].items()]
    return [
        f"mvn-core bench, float32.  ms/step: median of {config['repeat']} timed steps after "
        f"{warmup} warm-up steps (reference path: {slow[0]} after {slow[1]}); the 1st step "
        "(state, compilation) apart.",
        "x base: time / the baseline's.  GB/s: B/param x N / time.  % copy: of the copy "
        "bandwidth measured in this run (the faster of the library's copy and, on a CPU, "
        "a C loop on the kernels' threads).  peak MB: the most memory held during the steps, "
        "less that held before the optimizer was made; temp MB: less its state too (the "
        "temporaries); growth kB: over the timed steps and a few more (0 unless it leaks).",
        f"{env['cpus']} CPUs ({env['cpu']}); load average {_load(env['load_average'])} "
        f"before, {_load(env.get('load_average_after'))} after (CPU figures are noisy when "
        f"it nears the number of CPUs){'; ' + ', '.join(threads) if threads else ''}."]


def _load(values) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "unknown"


def _group_title(copy: dict, rows: list[dict]) -> str:
    baseline = next((r["baseline"] for r in rows if r["baseline"]), None)
    against = f"baseline {baseline}" if baseline else "no baseline (no peer): read % copy"
    device = f" ({copy['description']})" if copy["description"] else ""
    smallest, largest = copy["tensor_sizes"]
    return (f"{copy['backend']} {copy['device']}{device}: N = {copy['n']:,} parameters in "
            f"K = {copy['k']:,} tensors of {smallest:,} to {largest:,}; copy "
            f"{copy['gb_per_s']:.1f} GB/s{copies_detail(copy)}; {against}")


def copies_detail(copy: dict) -> str:
    """Both copies where a C loop ran beside the library's (older reports: neither)."""
    if copy.get("c_loop_gb_per_s") is None:
        return ""
    return f" (library {copy['library_gb_per_s']:.1f}, C loop {copy['c_loop_gb_per_s']:.1f})"


def _table_header() -> str:
    head = " ".join(f"{name:{align}}" for name, align in COLUMNS)
    return head + "\n" + "-" * len(head)


def _table_line(r: dict) -> str:
    cells = [r["rule"], r["implementation"], r["path"]]
    if r["error"]:
        return " ".join(f"{c:{a}}" for c, (_, a) in zip(cells, COLUMNS)) + f" FAILED: {r['error']}"
    cells += [f"{r['ms_per_step']:.3f}", f"{r['first_step_ms']:.0f}",
              _maybe(r["ratio_to_baseline"], "{:.2f}"), f"{r['gb_per_s']:.1f}",
              _maybe(r["fraction_of_copy"], "{:.0%}"), str(r["bytes_per_param"]),
              f"{r['state_bytes_per_param']:.2f}", _maybe(r["peak_bytes"], "{:.1f}", 1e-6),
              _maybe(r["temporary_bytes"], "{:.1f}", 1e-6),
              _maybe(r["memory_growth_bytes"], "{:.0f}", 1e-3)]
    return " ".join(f"{c:{a}}" for c, (_, a) in zip(cells, COLUMNS))


def _maybe(value, form: str, scale: float = 1.0) -> str:
    return "-" if value is None else form.format(value * scale)


def _target_line(t: dict) -> str:
    """A ratio or seconds as a number, a share of the copy bandwidth in percent."""
    form = "{:.0%}" if t["unit"] == "share" else "{:.2f}"
    if t["value"] is None:
        return (f"  {t['target']}: not measured in this run (target {t['comparison']} "
                f"{form.format(t['limit'])})")
    return (f"  {t['target']} [{t['device']}]: {form.format(t['value'])} (target "
            f"{t['comparison']} {form.format(t['limit'])}): {'met' if t['met'] else 'NOT met'}")


def scaling_lines(rows: list[dict]) -> list[str]:
    """Step time (ms) of each implementation and path against N, then against K."""
    lines = []
    groups = dict.fromkeys((r["backend"], r["device"], r["sweep"]) for r in rows)  # run order
    for backend, device, sweep in groups:
        these = [r for r in rows if (r["backend"], r["device"], r["sweep"]) == (backend, device, sweep)]
        sizes = sorted({r[sweep] for r in these})
        fixed = "k" if sweep == "n" else "n"
        lines += ["", f"scaling, {backend} {device}: ms/step as {sweep.upper()} grows "
                      f"({fixed.upper()} = {these[0][fixed]:,})",
                  f"{'implementation':<27} {'path':<12} " + " ".join(f"{_short(s):>9}" for s in sizes)]
        for label in dict.fromkeys((r["implementation"], r["path"]) for r in these):
            cells = {r[sweep]: r for r in these if (r["implementation"], r["path"]) == label}
            lines.append(f"{label[0]:<27} {label[1]:<12} " + " ".join(
                f"{_maybe(cells[s]['ms_per_step'], '{:.2f}') if s in cells else '':>9}"
                for s in sizes))
    return lines


def _short(count: int) -> str:
    for scale, suffix in ((1_000_000, "M"), (1_000, "k")):
        if count >= scale and count % (scale // 10) == 0:
            return f"{count / scale:g}{suffix}"
    return f"{count:,}"


def write_json(report: dict, path: str) -> None:
    """The report as JSON, to ``path`` or, for ``-``, to standard output."""
    text = json.dumps(report, indent=1)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


