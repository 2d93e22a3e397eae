"""``mvn-core bench``: the time of one optimizer step, rule by rule, on every backend and
execution path, against the peers measured in the same run.

For N float32 parameters in K tensors (by default 10M in 100 on a CPU, 200M in 400 on
a GPU) each row is one rule run by one implementation (ours, ``mvn-core``, or a peer)
on one path, and gives:

- the time per step: the median of the timed steps after the warm-up; the first step
  (state creation and, on a compiled path, compilation) apart;
- the ratio to the backend's baseline in the same run: ``torch.optim.AdamW(fused=True)``
  for PyTorch, ``optax.adam`` under ``jax.jit`` for JAX (none for NumPy and CuPy, which
  have no peer: their rows are read against the copy bandwidth);
- the effective bandwidth, :func:`bytes_per_param` x N / time, and its share of the
  copy bandwidth measured in the same run (a copy of N floats, read and write: the
  faster of the library's own copy and, on a CPU, a C loop run as the kernels are);
- memory: the state in bytes per parameter (from the state's arrays), the peak held
  during the steps beyond what was held before, and the growth over the timed steps
  (zero unless something leaks).

The backends' parts live in :mod:`.for_torch`, :mod:`.for_jax` and
:mod:`.for_arrays`, the timing in :mod:`.timing`, the report (text, JSON and
the speed targets) in :mod:`.report`.  ``--scaling`` adds how the
step time grows with N and with K (many small tensors) for MVN-Grad and the baselines.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable

import mvn_core

from .report import (copies_detail, environment, load_average, report_lines, targets,
                     write_json)
from .timing import (SETTLE, SLOW_SHARE, BackendBench, BenchCase, Measurement, c_copy_ms,
                     copy_ms, measure)

SCHEMA = "mvn-core-bench/1"
# Default N and K by the kind of device a backend runs on.
SIZES = {"cpu": (10_000_000, 100), "gpu": (200_000_000, 400)}
WARMUP = 10  # steps before the timed ones; memory growth is measured from here
REPEAT = 40  # timed steps
WARM_UP_N = 1024  # parameters of the tiny workload that warms a backend up
# The backends' bench modules: (module, attribute) of their BackendBench.
BENCHES = {"torch": ("for_torch", "BENCH"), "jax": ("for_jax", "BENCH"),
           "cupy": ("for_arrays", "CUPY"), "numpy": ("for_arrays", "NUMPY")}
DEFAULT_BACKENDS = ("torch", "jax", "cupy")
RULES = tuple(name for name, rule in mvn_core.rules.items() if rule.kind == "optimizer")
# --scaling: N at 1/10, 1 and 4 times the default (at its K), and K at a fixed N.
SCALING_N_FACTORS = (0.1, 1.0, 4.0)
SCALING_KS = (10, 1_000, 10_000)
SCALING_K_AT_N = 2_000_000
SCALING_RULE = "mvn"
SCALING_PEERS = ("torch.optim.AdamW", "optax.adam")  # Adam's, on each of their paths
# The largest K a backend is timed at by default, and why (--scaling-ks overrides it).
SCALING_K_LIMITS = {"jax": (1_000, "compiling one jitted step over 10,000 tensors took more "
                            "than 6 GB of memory and minutes on a CPU (jax 0.10); "
                            "--scaling-ks 10,1000,10000 times it anyway")}


def bytes_per_param(rule_name: str, itemsize: int = 4) -> int:
    """The bytes a step of ``rule_name`` must move per parameter, at least.

    Read the parameter and its gradient and write the parameter, then read and write
    each per-coordinate state buffer: ``itemsize * (3 + 2 B)``.  ``B`` counts the
    buffers of the rule's state type but those holding one number per tensor
    (NovoGrad's ``v``), which cost nothing per parameter.  A rule with a per-tensor
    statistic (NovoGrad's norm) must finish it before any coordinate's update: it reads
    the gradient once more.  For float32: MVN-Grad 36, Adam, AdaBelief and LaProp 28,
    MaxVA 44, NovoGrad 24, SGD 20.  A peer row counts the bytes of the rule it implements.
    """
    tensor_rule = mvn_core.rules[rule_name].tensor_rule
    buffers = [b for b in tensor_rule.buffer_names if b not in tensor_rule.scalar_buffers]
    extra_pass = tensor_rule.statistic is not None
    return itemsize * (3 + 2 * len(buffers) + extra_pass)


def gb_per_s(bytes_per_element: float, n: int, ms: float) -> float:
    """Effective bandwidth in GB/s (1e9 bytes) of moving ``bytes_per_element`` for each
    of ``n`` elements in ``ms`` milliseconds."""
    return bytes_per_element * n / (ms * 1e6)


def copy_gb_per_s(n: int, ms: float, itemsize: int = 4) -> float:
    """The bandwidth of a copy of ``n`` elements: each is read once and written once."""
    return gb_per_s(2 * itemsize, n, ms)


@dataclass(frozen=True)
class Config:
    """What to run; see ``mvn-core bench --help``.  ``n``/``k`` None: :data:`SIZES`."""

    rules: tuple = RULES
    backends: tuple = DEFAULT_BACKENDS
    paths: tuple | None = None  # None: every path
    device: str = "auto"
    n: int | None = None
    k: int | None = None
    warmup: int = WARMUP
    repeat: int = REPEAT
    peers: bool = True
    scaling: bool = False
    scaling_ks: tuple | None = None  # None: SCALING_KS, within SCALING_K_LIMITS


@dataclass
class Row:
    """One measured case (figures None where unknown; ``error`` if it raised)."""

    backend: str
    device: str
    kind: str  # "cpu" or "gpu"
    rule: str
    implementation: str
    path: str
    n: int
    k: int
    bytes_per_param: int
    compiled: bool = False  # the first step compiles (its time is apart)
    ms_per_step: float | None = None
    first_step_ms: float | None = None
    repeats: int = 0
    baseline: str | None = None
    ratio_to_baseline: float | None = None
    gb_per_s: float | None = None
    fraction_of_copy: float | None = None
    state_bytes_per_param: float | None = None
    peak_bytes: int | None = None
    temporary_bytes: int | None = None
    memory_growth_bytes: int | None = None
    growth_steps: int = 0
    memory_source: str = ""
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.implementation} {self.path}"


def case_label(case: BenchCase) -> str:
    return f"{case.implementation} {case.path}"


def complete_rows(rows: list[Row], copy_gbps: float | None) -> None:
    """Fill in each row's bandwidth, its share of ``copy_gbps`` and its ratio to the
    baseline row (the first whose ``label`` is the rows' ``baseline``)."""
    timings = {r.label: r.ms_per_step for r in rows if r.ms_per_step is not None}
    for r in rows:
        if r.ms_per_step is None:
            continue
        r.gb_per_s = gb_per_s(r.bytes_per_param, r.n, r.ms_per_step)
        r.fraction_of_copy = r.gb_per_s / copy_gbps if copy_gbps else None
        base = timings.get(r.baseline) if r.baseline else None
        r.ratio_to_baseline = r.ms_per_step / base if base else None


# --- running --------------------------------------------------------------------------

def backend_bench(name: str) -> BackendBench:
    module, attribute = BENCHES[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), attribute)


def known_paths() -> list[str]:
    return sorted({case.path for name in BENCHES for case in backend_bench(name).cases()})


def selected_cases(bench: BackendBench, config: Config, rule_names=None) -> list[BenchCase]:
    """The backend's cases for ``config``, baseline first (it is kept whatever the
    selection, for the ratios)."""
    rule_names = config.rules if rule_names is None else rule_names
    chosen = [c for c in bench.cases() if c.baseline or (
        c.rule in rule_names and (config.paths is None or c.path in config.paths)
        and (c.ours or config.peers))]
    return sorted(chosen, key=lambda c: not c.baseline)


def runnable(cases: list[BenchCase], kind: str) -> tuple[list[BenchCase], list[dict]]:
    """The cases whose modules are installed, and a skipped entry for each other one."""
    ok, skipped = [], []
    for case in cases:
        missing = [m for m in case.requires if importlib.util.find_spec(m) is None]
        if missing:
            skipped.append({"backend": case.backend, "kind": kind, "case": case_label(case),
                            "reason": f"{', '.join(missing)} not installed"})
        else:
            ok.append(case)
    return ok, skipped


def run_bench(config: Config = Config(), progress: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; returns the report (see :func:`report_lines` and ``--json``).

    The objects that exist when it starts (the libraries' own, by the hundred thousand)
    are frozen out of the garbage collections that precede each case (``gc.freeze``);
    scanning them every time would take most of a short run."""
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    report = {"schema": SCHEMA, "config": dataclasses.asdict(config),
              "environment": environment(), "copy": [], "rows": [], "scaling": [],
              "first_steps": [], "skipped": [], "targets": []}
    gc.collect()
    gc.freeze()
    try:
        for name in config.backends:
            run_backend(backend_bench(name), config, report, progress)
    finally:
        gc.unfreeze()
    report["targets"] = targets(report)
    report["environment"]["load_average_after"] = load_average()
    if "torch" in sys.modules:
        report["environment"]["torch_threads"] = sys.modules["torch"].get_num_threads()
    return report


def run_backend(bench: BackendBench, config: Config, report: dict, progress) -> None:
    """One backend's rows (and scaling rows) into ``report``, or why it was skipped."""
    kind = bench.device_kind(config.device)
    reason = bench.unavailable_reason(kind)
    if reason is not None:
        report["skipped"].append({"backend": bench.name, "kind": kind, "case": None,
                                  "reason": reason})
        progress(f"{bench.name} {kind}: skipped ({reason})")
        return
    n, k = config.n or SIZES[kind][0], config.k or SIZES[kind][1]
    cases, skipped = runnable(selected_cases(bench, config), kind)
    report["skipped"] += skipped
    warm_up(bench, kind, cases)
    copies, rows = run_sizes(bench, kind, [(n, k)], cases, progress, config.warmup,
                             config.repeat)
    report["copy"] += copies
    report["rows"] += [dataclasses.asdict(r) for r in rows]
    if bench.first_steps is not None and any(c.ours and c.compiled for c in cases):
        work = bench.workload(n, k, kind)
        first = dict(bench.first_steps(work), backend=bench.name, device=work.device_label,
                     kind=kind, n=n, k=k)
        report["first_steps"].append(first)
        progress(f"  first step of MVN-Grad's default path: {first['cold_s']:.2f} s with an "
                 f"empty kernel cache, {first['warm_s']:.3f} s with a warm one")
    if config.scaling:
        run_scaling(bench, kind, n, k, config, report, progress)


def warm_up(bench: BackendBench, kind: str, cases: list[BenchCase]) -> None:
    """A few unmeasured steps of the first case (the baseline) on a tiny workload, so
    that the backend's one-time costs (its runtime starting, kernel libraries loading)
    are not charged to the first case measured.  An error here is the case's own, and
    its row reports it."""
    if not cases:
        return
    work = bench.workload(WARM_UP_N, 2, kind)
    try:
        stepper = cases[0].make(work)
        try:
            for _ in range(2):
                stepper.step()
        finally:
            stepper.close()
    except Exception:  # reported by the case's row
        pass


def run_scaling(bench, kind, n, k, config, report, progress) -> None:
    """Scaling rows into ``report``: MVN-Grad on its selected paths and Adam's peers on
    theirs, at N scaled by :data:`SCALING_N_FACTORS` (K fixed) and at K in
    :data:`SCALING_KS` (N fixed), with a quarter of the steps.  Each row says which of
    the two it belongs to (``sweep``)."""
    ks, limit = config.scaling_ks, None
    if ks is None:
        limit = SCALING_K_LIMITS.get(bench.name)
        ks = [kk for kk in SCALING_KS if limit is None or kk <= limit[0]]
        if len(ks) < len(SCALING_KS):
            report["skipped"].append({"backend": bench.name, "kind": kind,
                                      "case": f"--scaling at K > {limit[0]:,}",
                                      "reason": limit[1]})
    sweeps = {"n": [(max(int(n * f), k), k) for f in SCALING_N_FACTORS],
              "k": [(SCALING_K_AT_N, kk) for kk in ks if kk <= SCALING_K_AT_N]}
    cases = [c for c in selected_cases(bench, config, rule_names=(SCALING_RULE, "adam"))
             if (c.ours and c.rule == SCALING_RULE) or c.implementation in SCALING_PEERS]
    cases, _ = runnable(cases, kind)
    for sweep, sizes in sweeps.items():
        _, rows = run_sizes(bench, kind, sizes, cases, progress,
                            warmup=max(2, config.warmup // SLOW_SHARE),
                            repeat=max(3, config.repeat // SLOW_SHARE))
        report["scaling"] += [dict(dataclasses.asdict(r), sweep=sweep) for r in rows]


def run_sizes(bench, kind, sizes, cases, progress, warmup, repeat):
    """Every case at every (N, K) of ``sizes``: the copy entries and the rows."""
    baseline = next((case_label(c) for c in cases if c.baseline), None)
    copies, rows = [], []
    for n, k in sizes:
        work = bench.workload(n, k, kind)
        library_gbps = copy_gb_per_s(n, copy_ms(work, repeat))
        loop_ms = c_copy_ms(n, repeat) if kind == "cpu" else None
        loop_gbps = None if loop_ms is None else copy_gb_per_s(n, loop_ms)
        copy_gbps = max(library_gbps, loop_gbps or 0.0)
        copies.append({"backend": bench.name, "device": work.device_label, "kind": kind,
                       "description": work.description, "n": n, "k": k,
                       "tensor_sizes": [min(work.sizes), max(work.sizes)],
                       "gb_per_s": copy_gbps, "library_gb_per_s": library_gbps,
                       "c_loop_gb_per_s": loop_gbps})
        progress(f"{bench.name} {work.device_label}: N = {n:,} in K = {k:,} tensors; "
                 f"copy {copy_gbps:.1f} GB/s{copies_detail(copies[-1])}")
        batch = [run_case(case, work, kind, baseline, warmup, repeat, progress)
                 for case in cases]
        complete_rows(batch, copy_gbps)
        rows += batch
        del work
        gc.collect()
    return copies, rows


def run_case(case, work, kind, baseline, warmup, repeat, progress) -> Row:
    """Measure one case (a case that raises gives a row with its error)."""
    if case.slow:
        warmup, repeat = max(2, warmup // SLOW_SHARE), max(2, repeat // SLOW_SHARE)
    row = Row(case.backend, work.device_label, kind, case.rule, case.implementation, case.path,
              work.n, work.k, bytes_per_param(case.rule), compiled=case.compiled,
              baseline=baseline, memory_source=work.memory.source)
    try:
        m = measure(case, work, warmup, repeat)
    except Exception as error:  # reported in the row; the other cases still run
        row.error = f"{type(error).__name__}: {error}"
        progress(f"  {case.rule:<9} {case_label(case)}: FAILED ({row.error})")
        return row
    _fill(row, m)
    progress(f"  {case.rule:<9} {case_label(case)}: {m.ms_per_step:.3f} ms/step "
             f"(first step {m.first_step_ms:.0f} ms)")
    return row


def _fill(row: Row, m: Measurement) -> None:
    row.ms_per_step, row.first_step_ms, row.repeats = m.ms_per_step, m.first_step_ms, m.repeats
    row.state_bytes_per_param = m.state_bytes / row.n
    row.peak_bytes, row.temporary_bytes = m.peak_bytes, m.temporary_bytes
    row.memory_growth_bytes = m.growth_bytes
    row.growth_steps = m.growth_steps


# --- the command line ---------------------------------------------------------------------

def count(text: str) -> int:
    """A positive count: ``10000000``, ``1e7``, ``10M``, ``2k``."""
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = float(number.replace("_", "")) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 10000000, 1e7, 10M)")
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole count: {text!r}")
    return int(value)


def _counts(text: str) -> tuple:
    return tuple(count(t) for t in text.split(","))


def _names(known: Callable[[], list[str]] | tuple, what: str):
    def parse(text: str) -> tuple:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        choices = known() if callable(known) else known
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {unknown or text!r}; known: {', '.join(choices)}")
        return names
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", type=_names(RULES, "rules"), default=RULES,
                        help=f"comma-separated rules (default: all, {','.join(RULES)})")
    parser.add_argument("--backends", type=_names(tuple(BENCHES), "backends"),
                        default=DEFAULT_BACKENDS,
                        help=f"comma-separated backends of {','.join(BENCHES)} "
                             f"(default {','.join(DEFAULT_BACKENDS)})")
    parser.add_argument("--paths", type=_names(known_paths, "paths"), default=None,
                        help="comma-separated paths: ours kernel, multi_tensor, reference "
                             "(torch), jit (JAX), arrays (NumPy), fused (CuPy); the peers' "
                             "foreach, fused, loop, jit (default: all; the baselines always run)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: each backend on its GPU where it has one, else the CPU")
    parser.add_argument("--n", type=count, default=None,
                        help="parameters (default 10M on a CPU, 200M on a GPU); 1e7, 10M work")
    parser.add_argument("--k", type=count, default=None,
                        help="tensors they are split into (default 100 on a CPU, 400 on a GPU)")
    parser.add_argument("--repeat", type=count, default=REPEAT,
                        help=f"timed steps per case (default {REPEAT})")
    parser.add_argument("--warmup", type=count, default=WARMUP,
                        help=f"steps before the timed ones, the first included (default "
                             f"{WARMUP}, at least {1 + SETTLE})")
    parser.add_argument("--no-peers", action="store_true",
                        help="only our rows and the baselines")
    parser.add_argument("--scaling", action="store_true",
                        help="also time MVN-Grad and AdamW/optax.adam as N and K grow")
    parser.add_argument("--scaling-ks", type=_counts, default=None,
                        help="the K of the scaling in K, at N = 2M (default 10,1000,10000; "
                             "JAX only to 1000)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the report as JSON to PATH ('-': standard output, "
                             "the table then goes to standard error)")


def config_from(args: argparse.Namespace) -> Config:
    return Config(rules=args.rules, backends=args.backends, paths=args.paths,
                  device=args.device, n=args.n, k=args.k, warmup=args.warmup,
                  repeat=args.repeat, peers=not args.no_peers, scaling=args.scaling,
                  scaling_ks=args.scaling_ks)


def main(args: argparse.Namespace) -> int:
    """Run ``mvn-core bench``; exit status 1 if a case failed (its row says why)."""
    if args.n is not None and args.k is not None and args.k > args.n:
        print(f"mvn-core bench: error: --k {args.k:,} tensors cannot hold --n {args.n:,} "
              "parameters", file=sys.stderr)
        return 2
    report = run_bench(config_from(args))
    out = sys.stderr if args.json == "-" else sys.stdout
    for line in report_lines(report):
        print(line, file=out)
    if args.json:
        write_json(report, args.json)
    return 1 if any(r["error"] for r in report["rows"] + report["scaling"]) else 0
