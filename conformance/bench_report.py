"""The report of ``mvn-core bench``: the speed targets computed from its rows, where
the figures come from (machine, load, versions), the tables as text, and JSON."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from typing import Callable

from .bench_timing import OURS, SETTLE, SLOW_SHARE
from .report import library_versions

TARGET_RULE = "mvn"  # the targets are MVN-Grad's


@dataclass(frozen=True)
class Target:
    """A figure of the speed issue's targets, computed from the rows of ``backend`` on
    devices of ``kind`` (None: any); met when ``value <= limit`` (``at_most``) or
    ``value >= limit``.  Printed, never asserted: timings depend on the machine."""

    text: str
    backend: str
    kind: str | None
    limit: float
    at_most: bool
    value: Callable[[list[dict]], float | None]


def _mvn_rows(rows, path=None) -> list[dict]:
    return [r for r in rows if r["implementation"] == OURS and r["rule"] == TARGET_RULE
            and r["ms_per_step"] is not None and path in (None, r["path"])]


def _peer(rows, implementation, path) -> dict | None:
    return next((r for r in rows if r["implementation"] == implementation and r["path"] == path
                 and r["ms_per_step"] is not None), None)


def _fastest_to_baseline(rows):
    ratios = [r["ratio_to_baseline"] for r in _mvn_rows(rows) if r["ratio_to_baseline"]]
    return min(ratios, default=None)


def _ratio_to(path, implementation, peer_path):
    def value(rows):
        ours, peer = _mvn_rows(rows, path), _peer(rows, implementation, peer_path)
        return ours[0]["ms_per_step"] / peer["ms_per_step"] if ours and peer else None
    return value


def _share_of_copy(path):
    def value(rows):
        ours = _mvn_rows(rows, path)
        return ours[0]["fraction_of_copy"] if ours else None
    return value


TARGETS = (
    Target("torch CPU: MVN-Grad's fastest path / AdamW fused", "torch", "cpu", 1.5, True,
           _fastest_to_baseline),
    Target("torch CPU: MVN-Grad multi_tensor (default) / AdamW foreach", "torch", "cpu", 2.0,
           True, _ratio_to("multi_tensor", "torch.optim.AdamW", "foreach")),
    Target("JAX: mvn_grad / optax.adam, both jitted", "jax", None, 1.2, True,
           _ratio_to("jit", "optax.adam", "jit")),
    Target("torch GPU: MVN-Grad fused, share of copy bandwidth at 36 B/param", "torch", "gpu",
           0.7, False, _share_of_copy("fused")),
    Target("JAX GPU: mvn_grad jitted, share of copy bandwidth at 36 B/param", "jax", "gpu",
           0.7, False, _share_of_copy("jit")),
    Target("CuPy: MVN-Grad arrays, share of copy bandwidth at 36 B/param", "cupy", "gpu", 0.5,
           False, _share_of_copy("arrays")),
)


def targets(rows: list[dict]) -> list[dict]:
    """Each target whose rows were measured, per device: its value and whether it is met."""
    out = []
    for t in TARGETS:
        devices = sorted({r["device"] for r in rows if r["backend"] == t.backend
                          and t.kind in (None, r["kind"])})
        for device in devices:
            value = t.value([r for r in rows if r["backend"] == t.backend
                             and r["device"] == device])
            if value is None:
                continue
            met = value <= t.limit if t.at_most else value >= t.limit
            out.append({"target": t.text, "device": device, "value": value,
                        "limit": t.limit, "comparison": "<=" if t.at_most else ">=", "met": met})
    return out


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
        "bandwidth measured in this run.  peak MB: the most memory held during the steps, "
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
            f"{copy['gb_per_s']:.1f} GB/s; {against}")


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
    """A ratio as a number, a share of the copy bandwidth in percent."""
    form = "{:.2f}" if t["comparison"] == "<=" else "{:.0%}"
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


